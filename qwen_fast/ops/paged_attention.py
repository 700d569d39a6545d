"""flash_attn_with_kvcache: append new K/V to a paged or contiguous cache and attend over it, with flash-attn 2.8.3's
signature, defaults (causal=False) and conventions.

Backends: flash_attn (flash-attn 2's own kernels where installed and its constraints allow: ops/flash_attn_backend.py),
triton (reshape_and_cache + the split-K paged attention of kernels/paged_attention.py; no host sync), cpu
(csrc/cpu/paged_attention.cpp: append and attend in one op), torch (the reference). Every backend implements
cache_leftpad, softcap, num_splits and the log-sum-exp itself. Two arguments are composed here, identically for
every backend: cache_batch_idx (a contiguous cache is B_cache pages of S_max rows; sequence b's block table is
[[cache_batch_idx[b]]]) and rotary_cos/rotary_sin (q and the new k rotated by the same backend's rotary_embedding
before the attention). alibi_slopes is refused.

fp8 caches (vLLM's kv_cache_dtype "fp8": float8_e4m3fn pages, or uint8 holding their bits, written by
reshape_and_cache_flash) are read with the keyword-only k_descale / v_descale of vLLM's flash-attn fork (fp32 [B, Hkv]
or one element): keys are fp8 * k_descale, values fp8 * v_descale (every backend). Appending new k/v into an fp8
cache here is refused (write them with reshape_and_cache_flash(..., "fp8", k_scale, v_scale) first).
"""

import torch

from qwen_fast.reference import kv_cache as reference

from . import flash_attn_backend
from ._checks import traced
from ._dispatch import INTERPRETER_DOT, Op
from ._library import define_triton_op, launcher, native_op
from .attention import ATTENTION_ORDER, check_attention_options
from .kv_cache import _reshape_and_cache_triton
from .kvcache_checks import (
    check_index_values,
    check_kvcache_args,
    check_lengths,
    check_options,
    check_rotary,
    check_used_blocks,
    fp8_cache,
    lengths_known,
)
from .rope import ROTARY_EMBEDDING

# --- the kernels' ops: cache_seqlens and block_table resolved, the window with causal folded in -------------------


def _fake_paged_attention(
    q, k_cache, v_cache, seqlens, block_table, leftpad, scale, left, right, softcap, splits, k_descale, v_descale,
    max_seqlen_k,
):  # fmt: skip
    check_kvcache_args(
        q, k_cache, v_cache, None, None, seqlens, block_table, None, leftpad, k_descale, v_descale, traced
    )
    lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


def _fake_flash_attn_with_kvcache(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_leftpad, scale, left, right, softcap, splits,
    k_descale, v_descale,
):  # fmt: skip
    check_kvcache_args(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, None, cache_leftpad, k_descale, v_descale, traced
    )
    lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


_paged_attention_triton = define_triton_op(
    "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, Tensor block_table, Tensor? leftpad, "
    "float softmax_scale, int window_left, int window_right, float softcap, int num_splits, Tensor? k_descale, "
    "Tensor? v_descale, int max_seqlen_k) -> (Tensor, Tensor)",
    launcher("paged_attention", "paged_attention"),
    _fake_paged_attention,
)
_flash_attn_with_kvcache_native = native_op("flash_attn_with_kvcache", _fake_flash_attn_with_kvcache)


def _kernel_args(q, k_cache, cache_seqlens, block_table, cache_batch_idx, softmax_scale, causal, window_size) -> tuple:
    """(cache_seqlens int32 [B], block_table int32 [B, M], scale, window_left, window_right) as the kernels take them.

    A contiguous cache [B_cache, S_max, Hkv, D] is the paged cache of B_cache pages of S_max rows with block table
    [[cache_batch_idx[0]], [cache_batch_idx[1]], ..] (default [[0], [1], ..]); causal is folded into the window
    (right edge 0). Built with device ops only: no host sync."""
    batch, device = q.shape[0], q.device
    if block_table is None:
        rows = torch.arange(batch, dtype=torch.int32, device=device) if cache_batch_idx is None else cache_batch_idx
        block_table = rows[:, None]
    if cache_seqlens is None or isinstance(cache_seqlens, int):
        fill = block_table.shape[1] * k_cache.shape[1] if cache_seqlens is None else cache_seqlens
        cache_seqlens = torch.full((batch,), fill, dtype=torch.int32, device=device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return cache_seqlens, block_table, scale, window_size[0], 0 if causal else window_size[1]


def _with_kvcache_triton(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_size,
    cache_batch_idx=None, cache_leftpad=None, softcap=0.0, num_splits=0, return_softmax_lse=False, k_descale=None,
    v_descale=None, max_seqlen_k=0,
):  # fmt: skip
    seqlens, table, scale, left, right = _kernel_args(
        q, k_cache, cache_seqlens, block_table, cache_batch_idx, softmax_scale, causal, window_size
    )
    if k is not None:  # the new tokens go to positions seqlens[b] + i, slots computed on the device
        block_size = k_cache.shape[1]
        positions = seqlens[:, None].long() + torch.arange(k.shape[1], device=q.device)
        slots = table.gather(1, positions // block_size).long() * block_size + positions % block_size
        key, value = k.flatten(0, 1).contiguous(), v.flatten(0, 1).contiguous()
        _reshape_and_cache_triton(key, value, k_cache, v_cache, slots.flatten())
        seqlens = seqlens + k.shape[1]
    out, lse = _paged_attention_triton(
        q, k_cache, v_cache, seqlens.int(), table, cache_leftpad, scale, left, right, float(softcap), num_splits,
        k_descale, v_descale, max_seqlen_k,
    )  # fmt: skip
    return (out, lse) if return_softmax_lse else out


def _with_kvcache_native(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_size,
    cache_batch_idx=None, cache_leftpad=None, softcap=0.0, num_splits=0, return_softmax_lse=False, k_descale=None,
    v_descale=None, max_seqlen_k=0,
):  # fmt: skip
    seqlens, table, scale, left, right = _kernel_args(
        q, k_cache, cache_seqlens, block_table, cache_batch_idx, softmax_scale, causal, window_size
    )
    if k_descale is not None:  # the extension takes fp8 caches as float8_e4m3fn
        k_cache, v_cache = k_cache.view(torch.float8_e4m3fn), v_cache.view(torch.float8_e4m3fn)
    out, lse = _flash_attn_with_kvcache_native(
        q, k_cache, v_cache, k, v, seqlens, table, cache_leftpad, scale, left, right, float(softcap), num_splits,
        k_descale, v_descale,
    )  # fmt: skip
    return (out, lse) if return_softmax_lse else out


def _with_kvcache_reference(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_size,
    cache_batch_idx=None, cache_leftpad=None, softcap=0.0, num_splits=0, return_softmax_lse=False, k_descale=None,
    v_descale=None, max_seqlen_k=0,
):  # fmt: skip
    return reference.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, num_splits=num_splits, return_softmax_lse=return_softmax_lse,
        k_descale=k_descale, v_descale=v_descale,
    )  # fmt: skip


# Called by nn/ and cache/ unchecked: (device, q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale,
# causal, window_size[, cache_batch_idx, cache_leftpad, softcap, num_splits, return_softmax_lse, k_descale,
# v_descale, max_seqlen_k]) with k_descale / v_descale fp32 [B, Hkv] for fp8 caches (given as their uint8 bits) and
# max_seqlen_k a host-known bound on the keys per sequence after the append (0: unknown), which sizes the triton
# kernel's split count without a host sync (a hint: the other backends do not need it).
FLASH_ATTN_WITH_KVCACHE = Op(
    "flash_attn_with_kvcache",
    {
        "triton": _with_kvcache_triton,
        "flash_attn": flash_attn_backend.flash_attn_with_kvcache,
        "cpu": _with_kvcache_native,
        "torch": _with_kvcache_reference,
    },
    ATTENTION_ORDER,
    interpreter_limit=INTERPRETER_DOT,
    backend_limits={"flash_attn": flash_attn_backend.kvcache_limit},
)


# --- rotary: q and the new k rotated by rotary_embedding on the same backend, before the attention -----------------


def _rotate(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [B, S, H, D] with the first table.shape[1] dims of each head rotated at positions int64 [B, S]."""
    rotary_dim = table.shape[1]
    part = x[..., :rotary_dim].flatten(0, 1).contiguous()  # [B * S, H, rotary_dim], as the rope kernels take it
    rotated, _ = ROTARY_EMBEDDING(x.device, positions.flatten(), part, part[:, :1], table, not interleaved)
    rotated = rotated.view(*x.shape[:-1], rotary_dim)
    return rotated if rotary_dim == x.shape[-1] else torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def _apply_rotary(q, k, rotary_cos, rotary_sin, cache_seqlens, moving: bool, interleaved: bool) -> tuple:
    """flash-attn's positions: k row i at cache_seqlens[b] + i; q row i there too when causal or windowed, else
    every q row at cache_seqlens[b]. The table is fp32 (one rounding, as flash-attn's kernel)."""
    batch, device = q.shape[0], q.device
    if not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    table = torch.cat((rotary_cos, rotary_sin), dim=-1).float()
    start = cache_seqlens.long()[:, None]
    q_steps = torch.arange(q.shape[1], device=device) if moving else torch.zeros(q.shape[1], dtype=torch.long,
                                                                                 device=device)  # fmt: skip
    k_steps = torch.arange(k.shape[1], device=device)
    q = _rotate(q, table, start + q_steps, interleaved)
    k = _rotate(k, table, start + k_steps, interleaved)
    return q, k


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | int | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Append new k/v to a paged or contiguous cache, then attend over it (flash-attn 2.8.3's
    `flash_attn_with_kvcache`: same parameters, defaults and results; math: qwen_fast.reference.kv_cache).

    Backends: triton (CUDA: split-K over the context, no host synchronisation, so a decode step can be captured in
    a CUDA graph), cpu, torch (the reference). The append runs the same backend's reshape_and_cache, the rotary the
    same backend's rotary_embedding. Decode (Sq = 1) and short appends (chunked prefill), any block_size.

    Args:
        q: [B, Sq, Hq, D] float32/float16/bfloat16.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] with block_table (paged), else [B_cache, S_max, Hkv, D];
            q's dtype. Mutated when k/v are given.
        k, v: [B, Sq_new, Hkv, D] or None: written at positions cache_seqlens[b] ... before attending.
        rotary_cos, rotary_sin: [seqlen_ro >= slots per sequence, rotary_dim / 2], q's dtype or fp32, or None:
            rotate q and the new k (requires k) at their cache positions (flash-attn's rule, see the reference).
        cache_seqlens: int32 [B] or an int: valid entries per sequence before this call (None: the whole cache).
        cache_batch_idx: int32 [B] or None: the contiguous cache row of sequence b (refused with block_table, as
            flash-attn). cache_leftpad: int32 [B] or None: entries before cache_leftpad[b] are not attended to.
        block_table: int32 [B, max_blocks_per_seq] or None. Too few slots for cache_seqlens (+ Sq_new) raises
            kvcache_checks.BlockTableTooSmallError, a RuntimeError (as flash-attn) that is also a ValueError.
        softmax_scale, causal (default False, bottom-right aligned), window_size: as flash_attn_func.
        softcap: > 0 caps the scores at softcap * tanh(scale * q.k / softcap). alibi_slopes: refused (must be None).
        rotary_interleaved: GPT-J pairs (True, flash-attn's default) or NeoX halves (False).
        num_splits: 0 = heuristic; n > 0 cuts each sequence's context into n slices merged by log-sum-exp (the
            triton split-K kernel and the cpu kernel's thread split; the reference ignores it). At most 128.
        return_softmax_lse: also return softmax_lse.
        k_descale, v_descale: keyword-only (vLLM's flash-attn fork), for an fp8 cache (float8_e4m3fn, or uint8
            holding its bits: reshape_and_cache_flash(..., "fp8", k_scale, v_scale)): fp32 [B, Hkv] or one element;
            keys read as fp8 * k_descale, values as fp8 * v_descale. No append into an fp8 cache (k/v None).

    Returns:
        out [B, Sq, Hq, D] in q's dtype; with return_softmax_lse (out, softmax_lse fp32 [B, Hq, Sq]), the natural
        log-sum-exp of each row's (capped) scores, +inf for a row with no key to attend to (flash-attn's value).

    Example (decode one token for 2 sequences holding 4 and 8 tokens, pages of 4 slots):
        >>> k_cache, v_cache = torch.zeros(8, 4, 1, 64), torch.zeros(8, 4, 1, 64)
        >>> block_table = torch.tensor([[3, 0, 0], [1, 2, 7]], dtype=torch.int32)
        >>> seqlens = torch.tensor([4, 8], dtype=torch.int32)
        >>> q, k, v = torch.randn(2, 1, 8, 64), torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64)
        >>> qwen_fast.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
        ...                                  block_table=block_table, causal=True).shape
        torch.Size([2, 1, 8, 64])
    """
    k_cache, v_cache, k_descale, v_descale = fp8_cache(q, k_cache, v_cache, k_descale, v_descale)
    check_kvcache_args(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, cache_leftpad, k_descale, v_descale
    )
    flags = {"return_softmax_lse": return_softmax_lse, "rotary_interleaved": rotary_interleaved}
    softcap = check_options(softcap, alibi_slopes, num_splits, flags)
    check_attention_options(softmax_scale, causal, window_size)
    paged = block_table is not None
    capacity = k_cache.shape[1] * (block_table.shape[1] if paged else 1)  # slots per sequence
    num_new = 0 if k is None else k.shape[1]
    table_shape = block_table.shape if paged else None
    longest = check_lengths(cache_seqlens, num_new, capacity, paged, table_shape, k_cache.shape[1])
    check_index_values(cache_batch_idx, cache_leftpad, cache_seqlens, k_cache.shape[0], capacity)
    if paged:
        check_used_blocks(block_table, k_cache.shape[0], k_cache.shape[1], cache_seqlens, num_new, longest)
    check_rotary(rotary_cos, rotary_sin, q, k, capacity)
    if rotary_cos is not None:
        moving = causal or tuple(window_size) != (-1, -1)
        q, k = _apply_rotary(q, k, rotary_cos, rotary_sin, cache_seqlens, moving, rotary_interleaved)
    return FLASH_ATTN_WITH_KVCACHE(
        q.device, q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, tuple(window_size),
        cache_batch_idx, cache_leftpad, softcap, num_splits, return_softmax_lse, k_descale, v_descale,
        longest if lengths_known(cache_seqlens) else 0,
    )  # fmt: skip
