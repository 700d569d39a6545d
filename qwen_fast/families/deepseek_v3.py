"""DeepSeek-V3: router logits upcast to fp32, sigmoid scores, a selection bias (e_score_correction_bias),
group-limited top-k (a group scores the sum of its top-2), renormalization (/ sum + 1e-20), x routed_scaling_factor,
fp32 weights; shared experts added. Its multi-head latent attention (q/k head dim 192, v head dim 128) is not served
by qwen_fast."""

from torch import nn

from .family import Family, RouterSpec, norm_topk_prob


def _routing(router: nn.Module) -> dict:
    return {
        "scoring_func": "sigmoid",
        "e_score_correction_bias": True,
        "num_expert_group": router.num_group,
        "topk_group": router.topk_group,
        "group_scoring": "top2_sum",  # DeepSeek-V3 scores a group by the sum of its top-2
        "routed_scaling_factor": float(router.routed_scaling_factor),
        "fp32_logits": True,
    }


FAMILY = Family(
    "DeepSeek-V3", "deepseek_v3", "DeepseekV3", attention="DeepseekV3Attention", route="",
    reason="multi-head latent attention (q/k and v head dims differ) is not implemented",
    moe_block="DeepseekV3MoE", router="DeepseekV3TopkRouter", experts="DeepseekV3Experts",
    routing=RouterSpec(casts_weights=False, renormalize=norm_topk_prob, routing_kwargs=_routing),
    shared=("shared_experts",),
    tiny=dict(moe_intermediate_size=16, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
              n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=None,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, norm_topk_prob=True,
              num_key_value_heads=4),  # MLA: a KV head per query head
)  # fmt: skip
