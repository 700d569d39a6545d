"""Tiny random transformers models of every family qwen_fast.patch supports, built from configs (nothing downloaded).

Sizes are small enough for Triton's interpreter; weights are seeded N(0, 1/fan_in) (norm weights near 1) so every
parameter matters and router logits stay O(1).
"""

import torch
import transformers

COMMON = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              max_position_embeddings=128, intermediate_size=48, bos_token_id=1, eos_token_id=None,
              pad_token_id=0)  # fmt: skip
# family -> (config class, model class, family-specific config arguments)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=7,
                       num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(moe_intermediate_size=16, n_routed_experts=8, n_group=2, topk_group=1,
                         num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                         q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                         norm_topk_prob=True, num_key_value_heads=4)),  # MLA: a KV head per query head
}  # fmt: skip
MOE_FAMILIES = [family for family, (_, _, extra) in FAMILIES.items() if extra.get("num_experts_per_tok")]


def randomize(module: torch.nn.Module) -> None:
    """Seeded N(0, 1/fan_in) weights and biases; weights of norms near 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def tiny_model(family: str, dtype: torch.dtype = torch.float32, **config_kw) -> torch.nn.Module:
    """A seeded tiny `family` model in eval mode, e.g. tiny_model("qwen3_moe")."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **config_kw})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    randomize(model)
    return model.to(dtype).eval()
