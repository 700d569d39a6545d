"""The op sample table, shared by `qwen-fast check` (the first sample of each op, fp32) and the test suite's op
harness (tests/test_ops.py: every sample, backend and dtype). Each op maps to an `OpSpec`: its samples (seeded
argument builders, awkward shapes and strided views included), its dtypes, and how it is compared with
`qwen_fast.reference` (see qwen_fast/cli/selftest.py, which runs one case)."""

from .attention import FLASH_ATTN, FLASH_ATTN_VARLEN, FLASH_ATTN_WITH_KVCACHE, RESHAPE_AND_CACHE
from .inputs import Inputs, OpSpec, Sample
from .linear import LINEAR
from .moe import FUSED_EXPERTS, FUSED_MOE, FUSED_TOPK, MOE_ALIGN_BLOCK_SIZE
from .rope import QK_NORM_ROPE_AND_CACHE, ROTARY_EMBEDDING

SPECS: dict[str, OpSpec] = {
    "fused_topk": FUSED_TOPK,
    "moe_align_block_size": MOE_ALIGN_BLOCK_SIZE,
    "fused_experts": FUSED_EXPERTS,
    "fused_moe": FUSED_MOE,
    "flash_attn_func": FLASH_ATTN,
    "flash_attn_varlen_func": FLASH_ATTN_VARLEN,
    "flash_attn_with_kvcache": FLASH_ATTN_WITH_KVCACHE,
    "reshape_and_cache": RESHAPE_AND_CACHE,
    "rotary_embedding": ROTARY_EMBEDDING,
    "qk_norm_rope_and_cache": QK_NORM_ROPE_AND_CACHE,
    "linear": LINEAR,
}

__all__ = ["SPECS", "Inputs", "OpSpec", "Sample"]
