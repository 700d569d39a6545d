"""flash_attn_with_kvcache: append new K/V to a paged or contiguous cache and attend over it, with flash-attn 2.8.3's
signature, defaults (causal=False) and conventions.

Backends: triton (reshape_and_cache + the split-K paged attention of kernels/paged_attention.py; no host sync), cpu
(csrc/cpu/paged_attention.cpp: append and attend in one op), torch (the reference). Every backend implements
cache_leftpad, softcap, num_splits and the log-sum-exp itself. Two arguments are composed here, identically for
every backend: cache_batch_idx (a contiguous cache is B_cache pages of S_max rows; sequence b's block table is
[[cache_batch_idx[b]]]) and rotary_cos/rotary_sin (q and the new k rotated by the same backend's rotary_embedding
before the attention). alibi_slopes is refused.
"""

import torch

from qwen_fast.reference import kv_cache as reference

from ._checks import FLOAT_DTYPES, Require, check_int, check_shape, check_tensor, raise_unless, traced
from ._dispatch import Op
from ._library import define_triton_op, launcher, native_op
from .attention import check_attention_options, check_heads
from .kv_cache import _reshape_and_cache_triton
from .rope import ROTARY_EMBEDDING


class BlockTableTooSmallError(RuntimeError, ValueError):
    """A block table with fewer slots than cache_seqlens (+ the new tokens) needs. flash-attn raises RuntimeError
    there; this is one (and a ValueError, qwen_fast's convention for bad input)."""


def check_kvcache_args(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx=None, cache_leftpad=None,
    require: Require = raise_unless,
) -> None:  # fmt: skip
    """flash_attn_with_kvcache's tensor contract (the eager check and the fakes, which get cache_seqlens and
    block_table as the kernels take them; `require`: see _checks.py). cache_seqlens may be an int or None here."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, require=require)
    batch, device = q.shape[0], q.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=device, require=require)
    check_tensor("v_cache", v_cache, dtypes=(q.dtype,), device=device, require=require)
    check_shape("v_cache", v_cache, k_cache.shape, "k_cache's shape", require)
    check_heads(q, k_cache, v_cache, require)
    if block_table is not None:
        check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=device, require=require)
        require(
            block_table.shape[0] == batch,
            ValueError,
            lambda: f"block_table [B, max_blocks] = {tuple(block_table.shape)} must have q's B = {batch} rows",
        )
        require(
            cache_batch_idx is None,
            ValueError,
            lambda: "cache_batch_idx is for a contiguous cache; a paged cache (block_table) does not take it",
        )
    elif cache_batch_idx is None:
        require(
            k_cache.shape[0] == batch,
            ValueError,
            lambda: (
                f"a contiguous k_cache [B, S_max, Hkv, D] = {tuple(k_cache.shape)} must have q's B = {batch} "
                "(pass block_table for a paged cache, or cache_batch_idx to pick its rows)"
            ),
        )
    for name, index in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if index is not None:
            check_tensor(name, index, ndim=1, dtypes=(torch.int32,), device=device, require=require)
            check_shape(name, index, q.shape[:1], "[B] =", require)
    require(
        (k is None) == (v is None),
        ValueError,
        lambda: "k and v must be given together (new keys and values to append) or both be None",
    )
    if k is not None:
        check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=device, require=require)
        check_tensor("v", v, dtypes=(q.dtype,), device=device, require=require)
        check_shape("k", k, (batch, k.shape[1], *k_cache.shape[2:]), "[B, Sq_new, Hkv, D] =", require)
        check_shape("v", v, k.shape, "k's shape", require)
        require(
            cache_seqlens is not None,
            ValueError,
            lambda: "cache_seqlens is required with new k/v: it says where to append them",
        )
    if isinstance(cache_seqlens, torch.Tensor):
        check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=device, require=require)
        check_shape("cache_seqlens", cache_seqlens, q.shape[:1], "[B] =", require)


# --- the kernels' ops: cache_seqlens and block_table resolved, the window with causal folded in -------------------


def _fake_paged_attention(q, k_cache, v_cache, seqlens, block_table, leftpad, scale, left, right, softcap, splits):
    check_kvcache_args(q, k_cache, v_cache, None, None, seqlens, block_table, None, leftpad, traced)
    lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


def _fake_flash_attn_with_kvcache(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_leftpad, scale, left, right, softcap, splits
):
    check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, block_table, None, cache_leftpad, traced)
    lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


_paged_attention_triton = define_triton_op(
    "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, Tensor block_table, Tensor? leftpad, "
    "float softmax_scale, int window_left, int window_right, float softcap, int num_splits) -> (Tensor, Tensor)",
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
    cache_batch_idx=None, cache_leftpad=None, softcap=0.0, num_splits=0, return_softmax_lse=False,
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
        q, k_cache, v_cache, seqlens.int(), table, cache_leftpad, scale, left, right, float(softcap), num_splits
    )
    return (out, lse) if return_softmax_lse else out


def _with_kvcache_native(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_size,
    cache_batch_idx=None, cache_leftpad=None, softcap=0.0, num_splits=0, return_softmax_lse=False,
):  # fmt: skip
    seqlens, table, scale, left, right = _kernel_args(
        q, k_cache, cache_seqlens, block_table, cache_batch_idx, softmax_scale, causal, window_size
    )
    out, lse = _flash_attn_with_kvcache_native(
        q, k_cache, v_cache, k, v, seqlens, table, cache_leftpad, scale, left, right, float(softcap), num_splits
    )
    return (out, lse) if return_softmax_lse else out


def _with_kvcache_reference(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_size,
    cache_batch_idx=None, cache_leftpad=None, softcap=0.0, num_splits=0, return_softmax_lse=False,
):  # fmt: skip
    return reference.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, num_splits=num_splits, return_softmax_lse=return_softmax_lse,
    )  # fmt: skip


# Called by nn/ and cache/ unchecked: (device, q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale,
# causal, window_size[, cache_batch_idx, cache_leftpad, softcap, num_splits, return_softmax_lse]).
FLASH_ATTN_WITH_KVCACHE = Op(
    "flash_attn_with_kvcache",
    {"triton": _with_kvcache_triton, "cpu": _with_kvcache_native, "torch": _with_kvcache_reference},
    {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
)


# --- value checks (CPU tensors, eager: on CUDA they would need a host sync) -----------------------------------------


def _on_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.numel() > 0 and not torch.compiler.is_compiling()


def _check_lengths(cache_seqlens, num_new: int, capacity: int, paged: bool, table_shape, block_size: int) -> int:
    """cache_seqlens + num_new fits each sequence's capacity; returns the longest sequence after the append (the
    capacity when unknown). A paged overflow names block_table (flash-attn's convention: a RuntimeError)."""
    if isinstance(cache_seqlens, torch.Tensor):
        if not _on_host(cache_seqlens):
            return capacity
        low, high = (int(bound) for bound in torch.aminmax(cache_seqlens))
    else:
        check_int("cache_seqlens", 0 if cache_seqlens is None else cache_seqlens, low=0)
        low = high = capacity - num_new if cache_seqlens is None else cache_seqlens
    if paged and low >= 0 and high + num_new > capacity:
        raise BlockTableTooSmallError(
            f"block_table [B, max_blocks] = {tuple(table_shape)} holds {capacity} slots per sequence (pages of "
            f"{block_size}), too few for cache_seqlens up to {high} plus {num_new} new tokens"
        )
    if low < 0 or high + num_new > capacity:
        raise ValueError(
            f"cache_seqlens must lie in [0, {capacity - num_new}] so that {num_new} new tokens fit the cache's "
            f"{capacity} slots per sequence, got [{low}, {high}]"
        )
    return high + num_new


def _check_used_blocks(block_table, num_blocks, block_size, cache_seqlens, num_new, longest) -> None:
    """The block_table entries a sequence uses lie in [0, num_blocks); entries past its length may hold anything.
    `longest`: the most positions a sequence holds after the append. One min/max over the columns the longest
    sequence uses; the per-row mask of used entries is built only when that finds an entry out of range (it may
    belong to a shorter sequence, which does not use it)."""
    if not _on_host(block_table):
        return
    columns = block_table[:, : -(-longest // block_size)]
    if columns.numel() == 0:
        return
    low, high = (int(bound) for bound in torch.aminmax(columns))
    if low >= 0 and high < num_blocks:
        return
    if cache_seqlens is None:
        lengths = torch.full((block_table.shape[0],), block_table.shape[1] * block_size)
    else:
        lengths = torch.as_tensor(cache_seqlens).expand(block_table.shape[0]) + num_new
    used = torch.arange(block_table.shape[1])[None, :] * block_size < lengths[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"block_table[{row}, {col}] = {int(block_table[row, col])} is used but not a block of k_cache "
            f"(which has {num_blocks})"
        )


def _check_index_values(cache_batch_idx, cache_leftpad, cache_seqlens, num_rows: int, capacity: int) -> None:
    if cache_batch_idx is not None and _on_host(cache_batch_idx):
        low, high = (int(bound) for bound in torch.aminmax(cache_batch_idx))
        if low < 0 or high >= num_rows:
            raise ValueError(f"cache_batch_idx holds [{low}, {high}], outside the cache's rows [0, {num_rows})")
    if cache_leftpad is not None and _on_host(cache_leftpad):
        ends = capacity if cache_seqlens is None else torch.as_tensor(cache_seqlens)
        bad = (cache_leftpad < 0) | (cache_leftpad > ends)
        if bad.any():
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache_leftpad[{b}] = {int(cache_leftpad[b])} must lie in [0, cache_seqlens[{b}]]")


def _check_options(softcap: object, alibi_slopes: object, num_splits: object, flags: dict) -> float:
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported by qwen_fast (no ALiBi bias in its kernels): pass None")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__} {softcap!r}")
    if not 0 <= softcap < float("inf"):
        raise ValueError(f"softcap must be finite and >= 0 (0 = off), got {softcap}")
    check_int("num_splits", num_splits, low=0, high=128)
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    return float(softcap)


# --- rotary: q and the new k rotated by rotary_embedding on the same backend, before the attention -----------------


def _check_rotary(rotary_cos, rotary_sin, q, k, capacity: int) -> None:
    if rotary_cos is None and rotary_sin is None:
        return
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if k is None:
        raise ValueError("rotary_cos/rotary_sin need the new k and v to rotate (flash-attn rotates the new keys)")
    check_tensor("rotary_cos", rotary_cos, ndim=2, dtypes=(q.dtype, torch.float32), device=q.device)
    check_tensor("rotary_sin", rotary_sin, dtypes=(rotary_cos.dtype,), device=q.device)
    check_shape("rotary_sin", rotary_sin, rotary_cos.shape, "rotary_cos's shape", raise_unless)
    rows, half = rotary_cos.shape
    if not 0 < 2 * half <= q.shape[-1]:
        raise ValueError(f"rotary_cos [seqlen_ro, rotary_dim / 2] = {tuple(rotary_cos.shape)} needs 0 < rotary_dim "
                         f"<= head dim {q.shape[-1]}")  # fmt: skip
    if rows < capacity:
        raise ValueError(f"rotary_cos has {rows} positions, fewer than the cache's {capacity} slots per sequence")


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
            BlockTableTooSmallError, a RuntimeError (as flash-attn) that is also a ValueError.
        softmax_scale, causal (default False, bottom-right aligned), window_size: as flash_attn_func.
        softcap: > 0 caps the scores at softcap * tanh(scale * q.k / softcap). alibi_slopes: refused (must be None).
        rotary_interleaved: GPT-J pairs (True, flash-attn's default) or NeoX halves (False).
        num_splits: 0 = heuristic; n > 0 cuts each sequence's context into n slices merged by log-sum-exp (the
            triton split-K kernel and the cpu kernel's thread split; the reference ignores it). At most 128.
        return_softmax_lse: also return softmax_lse.

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
    if isinstance(k_cache, torch.Tensor) and k_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8):
        raise TypeError(f"k_cache is {k_cache.dtype}: fp8 KV caches are not supported; caches hold q's dtype")
    check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, cache_leftpad)
    flags = {"return_softmax_lse": return_softmax_lse, "rotary_interleaved": rotary_interleaved}
    softcap = _check_options(softcap, alibi_slopes, num_splits, flags)
    check_attention_options(softmax_scale, causal, window_size)
    paged = block_table is not None
    capacity = k_cache.shape[1] * (block_table.shape[1] if paged else 1)  # slots per sequence
    num_new = 0 if k is None else k.shape[1]
    table_shape = block_table.shape if paged else None
    longest = _check_lengths(cache_seqlens, num_new, capacity, paged, table_shape, k_cache.shape[1])
    _check_index_values(cache_batch_idx, cache_leftpad, cache_seqlens, k_cache.shape[0], capacity)
    if paged:
        _check_used_blocks(block_table, k_cache.shape[0], k_cache.shape[1], cache_seqlens, num_new, longest)
    _check_rotary(rotary_cos, rotary_sin, q, k, capacity)
    if rotary_cos is not None:
        moving = causal or tuple(window_size) != (-1, -1)
        q, k = _apply_rotary(q, k, rotary_cos, rotary_sin, cache_seqlens, moving, rotary_interleaved)
    return FLASH_ATTN_WITH_KVCACHE(
        q.device, q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, tuple(window_size),
        cache_batch_idx, cache_leftpad, softcap, num_splits, return_softmax_lse,
    )  # fmt: skip
