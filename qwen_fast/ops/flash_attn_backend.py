"""The optional flash_attn backend: flash-attn 2's own CUDA kernels behind qwen_fast's three attention functions.

flash_attn_func, flash_attn_varlen_func and flash_attn_with_kvcache have flash-attn 2.8.3's signatures, so the
backend passes the arguments through: nothing is converted but the window (already the pair of ints flash-attn
takes) and the outputs (qwen_fast's ops return (out, lse), the lse empty unless asked for). It is usable where the
`flash_attn` package imports, on CUDA tensors of an sm_80+ GPU (`_dispatch._flash_attn_problem`), and auto prefers
it there for these three ops. Per call, `*_limit` below names what flash-attn 2 does not take; auto then runs the
next backend of the order (triton), and a forced flash_attn backend raises with that reason:

- dtypes: fp16 and bf16 only (no fp32);
- head dims: multiples of 8 up to 256;
- flash_attn_with_kvcache: a paged cache's block_size must be a multiple of 256, and no fp8 cache (k_descale /
  v_descale are vLLM's fork, not flash-attn 2).

The append and the rotary of flash_attn_with_kvcache stay where qwen_fast puts them: the rotary runs before the op
(qwen_fast's rotary_embedding), the append is flash-attn's (k/v passed through). bench_attention and bench_kv_cache
take this backend as their baseline on CUDA when it is importable.
"""

import importlib

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
PAGE_MULTIPLE = 256  # flash-attn 2's paged KV: block_size % 256 == 0


def _module():
    return importlib.import_module("flash_attn")


def _tensors_limit(q: torch.Tensor) -> str | None:
    if q.dtype not in HALF_DTYPES:
        return f"flash-attn takes float16/bfloat16, got {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 256:
        return f"flash-attn takes head dims that are multiples of 8 up to 256, got {head_dim}"
    return None


def dense_limit(q, *args, **kwargs) -> str | None:
    """flash_attn_func's and flash_attn_varlen_func's constraints (the ops' arguments; q is the first)."""
    return _tensors_limit(q)


def kvcache_limit(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale=None, causal=False, window_size=(-1, -1),
    cache_batch_idx=None, cache_leftpad=None, softcap=0.0, num_splits=0, return_softmax_lse=False, k_descale=None,
    v_descale=None, max_seqlen_k=0,
) -> str | None:  # fmt: skip
    """flash_attn_with_kvcache's constraints (FLASH_ATTN_WITH_KVCACHE's arguments)."""
    if k_descale is not None:
        return "flash-attn 2 reads no fp8 cache (k_descale/v_descale are vLLM's fork)"
    if block_table is not None and k_cache.shape[1] % PAGE_MULTIPLE:
        return f"flash-attn's paged KV needs block_size % {PAGE_MULTIPLE} == 0, got block_size {k_cache.shape[1]}"
    return _tensors_limit(q)


def flash_attn(q, k, v, softmax_scale, causal, window_left, window_right, softcap, return_lse):
    out = _module().flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal, window_size=(window_left, window_right),
        softcap=softcap, return_attn_probs=return_lse,
    )  # fmt: skip
    return (out[0], out[1]) if return_lse else (out, q.new_empty(0, dtype=torch.float32))


def flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_left, window_right, softcap,
                      return_lse):  # fmt: skip
    out = _module().flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
        window_size=(window_left, window_right), softcap=softcap, return_attn_probs=return_lse,
    )  # fmt: skip
    return (out[0], out[1]) if return_lse else (out, q.new_empty(0, dtype=torch.float32))


def flash_attn_with_kvcache(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_size,
    cache_batch_idx=None, cache_leftpad=None, softcap=0.0, num_splits=0, return_softmax_lse=False, k_descale=None,
    v_descale=None, max_seqlen_k=0,
):  # fmt: skip
    """FLASH_ATTN_WITH_KVCACHE's arguments (max_seqlen_k is qwen_fast's split hint: flash-attn sizes its own)."""
    return _module().flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, softmax_scale=softmax_scale, causal=causal,
        window_size=tuple(window_size), softcap=softcap, num_splits=num_splits, return_softmax_lse=return_softmax_lse,
    )  # fmt: skip
