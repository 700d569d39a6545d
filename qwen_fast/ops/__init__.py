"""The functional API: input checks at the boundary, then per-call backend dispatch (see _dispatch.py)."""

from ._dispatch import BACKENDS, Op, forced_backend, record_backends, reread_environment, use_backend
from .attention import FLASH_ATTN, FLASH_ATTN_VARLEN, flash_attn_func, flash_attn_varlen_func
from .kv_cache import RESHAPE_AND_CACHE, reshape_and_cache, reshape_and_cache_flash
from .linear import LINEAR, linear
from .moe import FUSED_EXPERTS, FUSED_MOE, fused_experts, fused_moe
from .moe_align import MOE_ALIGN_BLOCK_SIZE, moe_align_block_size
from .paged_attention import FLASH_ATTN_WITH_KVCACHE, flash_attn_with_kvcache
from .rope import QK_NORM_ROPE_AND_CACHE, ROTARY_EMBEDDING, qk_norm_rope_and_cache, rotary_embedding
from .routing import FUSED_TOPK, fused_topk, grouped_topk

# Every public op, by name: what qwen_fast.backends() reports on.
OPS: dict[str, Op] = {
    op.name: op
    for op in (
        FUSED_TOPK,
        MOE_ALIGN_BLOCK_SIZE,
        FUSED_EXPERTS,
        FUSED_MOE,
        FLASH_ATTN,
        FLASH_ATTN_VARLEN,
        FLASH_ATTN_WITH_KVCACHE,
        RESHAPE_AND_CACHE,
        ROTARY_EMBEDDING,
        QK_NORM_ROPE_AND_CACHE,
        LINEAR,
    )
}

__all__ = [
    "BACKENDS",
    "OPS",
    "Op",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "forced_backend",
    "fused_experts",
    "fused_moe",
    "fused_topk",
    "grouped_topk",
    "linear",
    "moe_align_block_size",
    "qk_norm_rope_and_cache",
    "record_backends",
    "reread_environment",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "rotary_embedding",
    "use_backend",
]
