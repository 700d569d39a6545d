"""DeepSeek-V3 routing: sigmoid scores, a selection bias, group-limited top-k, x routed_scaling_factor, plus shared
experts. Its multi-head latent attention (q/k head dim 192, v head dim 128) is not served by qwen_fast."""

from .family import Family

FAMILY = Family("DeepSeek-V3", "deepseek_v3", moe_block="DeepseekV3MoE", attention="DeepseekV3Attention", route="",
                reason="multi-head latent attention (q/k and v head dims differ) is not implemented")  # fmt: skip
