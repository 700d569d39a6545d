"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen3-MoE's routing plus a shared expert scaled by
sigmoid(shared_expert_gate(x)); GQA attention with q/k/v biases and no q/k norm."""

from .family import Family, RouterSpec, norm_topk_prob

FAMILY = Family(
    "Qwen2-MoE", "qwen2_moe", "Qwen2Moe", attention="Qwen2MoeAttention", route="module",
    moe_block="Qwen2MoeSparseMoeBlock", router="Qwen2MoeTopKRouter", experts="Qwen2MoeExperts",
    routing=RouterSpec(casts_weights=True, renormalize=norm_topk_prob), shared=("shared_expert", "shared_expert_gate"),
    tiny=dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=7, num_experts_per_tok=2),
)  # fmt: skip
