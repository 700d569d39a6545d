"""Pure-PyTorch ground truth for every qwen_fast op.

Each function has the name and signature of the public API (see qwen_fast/__init__.py) and is written as the
plainest PyTorch that states the math, with transformers' dtype casts spelled out. These are the specification:
every kernel is tested against them, and they are tested against transformers' own modules.
"""

from .attention import flash_attn_func, flash_attn_varlen_func
from .kv_cache import flash_attn_with_kvcache, reshape_and_cache, reshape_and_cache_flash
from .linear import linear
from .moe import fused_experts, fused_moe
from .moe_align import moe_align_block_size
from .norm import rms_norm
from .quant import dequantize, quantize_fp8, quantize_int8
from .rope import apply_rotary_emb, compute_cos_sin_cache, qk_norm_rope_and_cache, rotary_embedding
from .routing import fused_topk, topk_routing

__all__ = [
    "apply_rotary_emb",
    "compute_cos_sin_cache",
    "dequantize",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "fused_experts",
    "fused_moe",
    "fused_topk",
    "linear",
    "moe_align_block_size",
    "qk_norm_rope_and_cache",
    "quantize_fp8",
    "quantize_int8",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "rms_norm",
    "rotary_embedding",
    "topk_routing",
]
