"""Drop-in MoE modules with transformers 5.x's parameter names and layouts, run by qwen_fast's kernels.

- TopKRouter: router logits, then fused_topk; `from_hf` keeps it an instance of the HF router class.
- MoEExperts: gate_up_proj [E, 2I, H] and down_proj [E, H, I], run by fused_experts; in the model dtype or quantized
  (fp8 block-scaled, int8 per channel: `quantize`, or `from_hf` of transformers' FP8Experts).
- SparseMoeBlock: router + experts + shared expert(s); `from_hf(block)` for Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE and
  DeepSeek-V3 shares the block's parameters (no copy).
- GQAAttention: Qwen3 / Qwen3-MoE / Qwen2 / Qwen2-MoE attention on qwen_fast's attention ops; reads the pages of a
  qwen_fast.PagedKVCache directly.
- Linear: an nn.Linear that runs qwen_fast's linear op at decode sizes on CPU (the LM head of a patched model).
"""

from .attention import GQAAttention
from .experts import MoEExperts
from .linear import Linear
from .moe_block import SparseMoeBlock
from .router import TopKRouter

__all__ = ["GQAAttention", "Linear", "MoEExperts", "SparseMoeBlock", "TopKRouter"]
