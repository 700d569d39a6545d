"""qwen_fast: fast kernels for Qwen3-MoE-style inference (routing, grouped-GEMM MoE, GQA attention, paged KV cache).

Every op runs on one of four backends, chosen per call from the tensors' device: `cuda` and `cpu` (the C++
extension), `triton`, and `torch` (the pure-PyTorch reference, `qwen_fast.reference`). `qwen_fast.backends()`
reports what is built and usable here; `qwen_fast.use_backend(name)` or QWEN_FAST_BACKEND=<name> forces one.
"""

from . import _native, cache, nn, reference  # noqa: F401  (_native loads the extension before the ops register fakes)
from .integrations import PatchHandle, patch
from .ops import (
    OPS,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    fused_experts,
    fused_moe,
    fused_topk,
    grouped_topk,
    linear,
    moe_align_block_size,
    qk_norm_rope_and_cache,
    record_backends,
    reshape_and_cache,
    reshape_and_cache_flash,
    rotary_embedding,
    use_backend,
)
from .ops.report import backends as _backends
from .quantize import quantize_experts, quantize_fp8, quantize_int8

__version__ = "0.1.0"


def backends() -> dict[str, dict[str, str]]:
    """Per op, per backend ("cuda", "triton", "cpu", "torch"): "usable on cpu", "built; no CUDA device here", or
    why it cannot run here ("not implemented", "the C++ extension is not built (...)", ...).

    >>> print(qwen_fast.ops.report.format_backends(qwen_fast.backends()))
    """
    return _backends(OPS)


def __getattr__(name: str):
    """qwen_fast.PagedKVCache and qwen_fast.register_transformers are imported on first use: they need transformers."""
    if name == "PagedKVCache":
        return cache.PagedKVCache
    if name == "register_transformers":
        from .integrations import register

        return register
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PagedKVCache",
    "PatchHandle",
    "backends",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "fused_experts",
    "fused_moe",
    "fused_topk",
    "grouped_topk",
    "linear",
    "moe_align_block_size",
    "nn",
    "patch",
    "qk_norm_rope_and_cache",
    "quantize_experts",
    "quantize_fp8",
    "quantize_int8",
    "record_backends",
    "reference",
    "register_transformers",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "rotary_embedding",
    "use_backend",
]
