"""Mixtral: softmax top-k routing that always renormalizes, weights kept fp32 (training adds input jitter). Its
attention is plain GQA, served through the "qwen_fast" attention interface (transformers keeps the projections and
RoPE)."""

from .family import Family, RouterSpec

FAMILY = Family(
    "Mixtral", "mixtral", "Mixtral", attention="MixtralAttention", route="interface",
    moe_block="MixtralSparseMoeBlock", router="MixtralTopKRouter", experts="MixtralExperts",
    routing=RouterSpec(casts_weights=False, renormalize=lambda router: True),
    tiny=dict(num_local_experts=4, num_experts_per_tok=2),
)  # fmt: skip
