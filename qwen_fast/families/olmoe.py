"""OLMoE: Qwen3-MoE's routing. Its attention normalizes q and k over all heads at once (not per head) and may clip
q/k/v, so transformers' module stays and attends through the "qwen_fast" attention interface."""

from .family import Family, RouterSpec, norm_topk_prob

FAMILY = Family(
    "OLMoE", "olmoe", "Olmoe", attention="OlmoeAttention", route="interface",
    moe_block="OlmoeSparseMoeBlock", router="OlmoeTopKRouter", experts="OlmoeExperts",
    routing=RouterSpec(casts_weights=True, renormalize=norm_topk_prob),
    tiny=dict(num_experts=8, num_experts_per_tok=2),
)  # fmt: skip
