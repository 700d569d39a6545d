"""Tiny random transformers models of every family qwen_fast.patch supports (each family's record in
qwen_fast/families/ gives its tiny config), built from configs (nothing downloaded).

Sizes are small enough for Triton's interpreter; weights are seeded N(0, 1/fan_in) (norm weights near 1) so every
parameter matters and router logits stay O(1).
"""

import torch
import transformers

import qwen_fast.families

COMMON = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              max_position_embeddings=128, intermediate_size=48, bos_token_id=1, eos_token_id=None,
              pad_token_id=0)  # fmt: skip
# family (config.model_type) -> (config class, model class, family-specific config arguments): qwen_fast/families/
FAMILIES = {f.model_type: (f"{f.prefix}Config", f"{f.prefix}ForCausalLM", f.tiny) for f in qwen_fast.families.FAMILIES}
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
