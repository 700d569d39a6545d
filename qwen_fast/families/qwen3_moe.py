"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): router logits in the model dtype, softmax in fp32, top-k, optional
renormalization (norm_topk_prob), weights cast to the model dtype; no shared expert. GQA attention with per-head q/k
RMSNorm."""

from .family import Family, RouterSpec, norm_topk_prob

FAMILY = Family(
    "Qwen3-MoE", "qwen3_moe", "Qwen3Moe", attention="Qwen3MoeAttention", route="module",
    moe_block="Qwen3MoeSparseMoeBlock", router="Qwen3MoeTopKRouter", experts="Qwen3MoeExperts",
    routing=RouterSpec(casts_weights=True, renormalize=norm_topk_prob),
    tiny=dict(head_dim=16, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
)  # fmt: skip
