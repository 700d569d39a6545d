"""Paged KV cache ops: reshape_and_cache (write new K/V into the block pool) and flash_attn_with_kvcache."""

import torch

from qwen_fast.reference import kv_cache as reference

from ._checks import (
    FLOAT_DTYPES,
    Require,
    check_int,
    check_last_dim_contiguous,
    check_shape,
    check_tensor,
    raise_unless,
    same_sizes,
    traced,
)
from ._dispatch import INTERPRETER_DOT, NATIVE_FIRST, Op
from ._library import define_triton_op, launcher, native_op
from .attention import check_attention_options, check_heads


def check_cache_write_args(key, value, key_cache, value_cache, slot_mapping, require: Require = raise_unless) -> None:
    """reshape_and_cache's contract (the eager check and the fake; `require`: see _checks.py)."""
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES, require=require)
    device = key.device
    check_tensor("value", value, dtypes=(key.dtype,), device=device, require=require)
    check_shape("value", value, key.shape, "[N, Hkv, D] = key's shape", require)
    check_tensor("key_cache", key_cache, ndim=4, dtypes=(key.dtype,), device=device, require=require)
    check_tensor("value_cache", value_cache, dtypes=(key.dtype,), device=device, require=require)
    check_shape(
        "value_cache", value_cache, key_cache.shape, "[num_blocks, block_size, Hkv, D] = key_cache's shape", require
    )
    require(
        same_sizes(key_cache.shape[2:], key.shape[1:]),
        ValueError,
        lambda: (
            f"key_cache [num_blocks, block_size, Hkv, D] = {tuple(key_cache.shape)} does not match key "
            f"[N, Hkv, D] = {tuple(key.shape)} in Hkv and D"
        ),
    )
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=device, require=require)
    check_shape("slot_mapping", slot_mapping, key.shape[:1], "[N] with N = key.shape[0] =", require)
    for name, tensor in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        check_last_dim_contiguous(name, tensor, require)
    require(
        same_sizes(value.stride(), key.stride()) & same_sizes(value_cache.stride(), key_cache.stride()),
        ValueError,
        lambda: (
            f"value and value_cache must have the strides of key and key_cache, got {value.stride()} vs "
            f"{key.stride()} and {value_cache.stride()} vs {key_cache.stride()}"
        ),
    )


def _fake_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    check_cache_write_args(key, value, key_cache, value_cache, slot_mapping, traced)


_reshape_and_cache_triton = define_triton_op(
    "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) "
    "-> ()",
    launcher("kv_cache", "reshape_and_cache"),
    _fake_reshape_and_cache,
)
_reshape_and_cache_native = native_op("reshape_and_cache", _fake_reshape_and_cache)

RESHAPE_AND_CACHE = Op(
    "reshape_and_cache",
    {
        "cuda": _reshape_and_cache_native,
        "triton": _reshape_and_cache_triton,
        "cpu": _reshape_and_cache_native,
        "torch": reference.reshape_and_cache,
    },
    NATIVE_FIRST,
)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys and values into the paged caches, in place (vLLM's `reshape_and_cache_flash` layout).

    Args:
        key: [N, Hkv, D] float32/float16/bfloat16, one row per new token.
        value: [N, Hkv, D], key's dtype and strides.
        key_cache: [num_blocks, block_size, Hkv, D], key's dtype; mutated.
        value_cache: key_cache's shape, dtype and strides; mutated.
        slot_mapping: [N] int64; token i goes to block slot // block_size at offset slot % block_size. A negative
            slot is skipped (padding). Slots past the pool are an error (checked on CPU; on CUDA the check would
            need a host sync and is skipped).

    Example:
        >>> kc = torch.zeros(4, 16, 2, 64); vc = torch.zeros_like(kc)
        >>> k = torch.randn(3, 2, 64); v = torch.randn(3, 2, 64)
        >>> qwen_fast.reshape_and_cache(k, v, kc, vc, torch.tensor([0, 17, -1]))
        >>> torch.equal(kc[1, 1], k[1])
        True
    """
    check_cache_write_args(key, value, key_cache, value_cache, slot_mapping)
    device = key.device
    if device.type == "cpu" and slot_mapping.numel() and not torch.compiler.is_compiling():
        capacity = key_cache.shape[0] * key_cache.shape[1]
        last = int(slot_mapping.max())
        if last >= capacity:
            raise ValueError(f"slot_mapping holds slot {last}, past the cache's {capacity} slots")
    RESHAPE_AND_CACHE(device, key, value, key_cache, value_cache, slot_mapping)


# --- flash_attn_with_kvcache: the cpu kernel appends and attends in one op; triton = reshape_and_cache + attention ---


def _fake_paged_attention(q, k_cache, v_cache, seqlens, block_table, softmax_scale, window_left, window_right):
    check_kvcache_args(q, k_cache, v_cache, None, None, seqlens, block_table, traced)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _fake_flash_attn_with_kvcache(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, window_left, window_right
):
    check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, block_table, traced)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_paged_attention_triton = define_triton_op(
    "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, Tensor block_table, "
    "float softmax_scale, int window_left, int window_right) -> Tensor",
    launcher("paged_attention", "paged_attention"),
    _fake_paged_attention,
)
_flash_attn_with_kvcache_native = native_op("flash_attn_with_kvcache", _fake_flash_attn_with_kvcache)


def _kernel_args(q, k_cache, cache_seqlens, block_table, softmax_scale, causal, window_size) -> tuple:
    """(cache_seqlens int32 [B], block_table int32 [B, M], scale, window_left, window_right) as the kernels take them.

    A contiguous cache [B, S_max, Hkv, D] is the paged cache of B pages of S_max rows with block table [[0], [1], ..];
    causal is folded into the window (right edge 0). Built with device ops only: no host sync."""
    batch, device = q.shape[0], q.device
    if block_table is None:
        block_table = torch.arange(batch, dtype=torch.int32, device=device)[:, None]
    if cache_seqlens is None or isinstance(cache_seqlens, int):
        fill = block_table.shape[1] * k_cache.shape[1] if cache_seqlens is None else cache_seqlens
        cache_seqlens = torch.full((batch,), fill, dtype=torch.int32, device=device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return cache_seqlens, block_table, scale, window_size[0], 0 if causal else window_size[1]


def _with_kvcache_triton(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_size):
    seqlens, table, scale, left, right = _kernel_args(
        q, k_cache, cache_seqlens, block_table, softmax_scale, causal, window_size
    )
    if k is not None:  # the new tokens go to positions seqlens[b] + i, slots computed on the device
        block_size = k_cache.shape[1]
        positions = seqlens[:, None].long() + torch.arange(k.shape[1], device=q.device)
        slots = table.gather(1, positions // block_size).long() * block_size + positions % block_size
        key, value = k.flatten(0, 1).contiguous(), v.flatten(0, 1).contiguous()
        _reshape_and_cache_triton(key, value, k_cache, v_cache, slots.flatten())
        seqlens = seqlens + k.shape[1]
    return _paged_attention_triton(q, k_cache, v_cache, seqlens.int(), table, scale, left, right)


def _with_kvcache_native(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_size):
    seqlens, table, scale, left, right = _kernel_args(
        q, k_cache, cache_seqlens, block_table, softmax_scale, causal, window_size
    )
    return _flash_attn_with_kvcache_native(q, k_cache, v_cache, k, v, seqlens, table, scale, left, right)


FLASH_ATTN_WITH_KVCACHE = Op(
    "flash_attn_with_kvcache",
    {"triton": _with_kvcache_triton, "cpu": _with_kvcache_native, "torch": reference.flash_attn_with_kvcache},
    {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    interpreter_limit=INTERPRETER_DOT,
)


def check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, block_table, require: Require = raise_unless) -> None:
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
    else:
        require(
            k_cache.shape[0] == batch,
            ValueError,
            lambda: (
                f"a contiguous k_cache [B, S_max, Hkv, D] = {tuple(k_cache.shape)} must have q's B = {batch} "
                "(pass block_table for a paged cache)"
            ),
        )
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


def _check_used_blocks(block_table, num_blocks, block_size, cache_seqlens, num_new, longest) -> None:
    """The block_table entries a sequence uses lie in [0, num_blocks); entries past its length may hold anything.
    `longest`: the most positions a sequence holds after the append. Checked on CPU only (on CUDA it would need a
    host sync): one min/max over the columns the longest sequence uses; the per-row mask of used entries is built
    only when that finds an entry out of range (it may belong to a shorter sequence, which does not use it)."""
    if block_table.device.type != "cpu" or block_table.numel() == 0 or torch.compiler.is_compiling():
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


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | int | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Append new k/v to a paged or contiguous cache, then attend over it (flash-attn's `flash_attn_with_kvcache`).

    Backends: triton (CUDA: split-K over the context, no host synchronisation, so a decode step can be captured in
    a CUDA graph; kernels/paged_attention.py), cpu (csrc/cpu/paged_attention.cpp), torch (the reference). The append
    runs the same backend's reshape_and_cache. Decode (Sq = 1) and short appends (chunked prefill), any block_size.

    Args:
        q: [B, Sq, Hq, D] float32/float16/bfloat16.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] with block_table (paged), else [B, S_max, Hkv, D]; q's
            dtype. Mutated when k/v are given.
        k, v: [B, Sq_new, Hkv, D] or None: written at positions cache_seqlens[b] ... before attending.
        cache_seqlens: int32 [B] or an int: valid entries per sequence before this call (None: the whole cache).
        block_table: int32 [B, max_blocks_per_seq] or None.
        softmax_scale, causal (default True, bottom-right aligned), window_size: as flash_attn_func.

    Returns:
        [B, Sq, Hq, D] in q's dtype.

    Example (decode one token for 2 sequences holding 4 and 8 tokens, pages of 4 slots):
        >>> k_cache, v_cache = torch.zeros(8, 4, 1, 64), torch.zeros(8, 4, 1, 64)
        >>> block_table = torch.tensor([[3, 0, 0], [1, 2, 7]], dtype=torch.int32)
        >>> seqlens = torch.tensor([4, 8], dtype=torch.int32)
        >>> q, k, v = torch.randn(2, 1, 8, 64), torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64)
        >>> qwen_fast.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, seqlens, block_table).shape
        torch.Size([2, 1, 8, 64])
    """
    check_kvcache_args(q, k_cache, v_cache, k, v, cache_seqlens, block_table)
    capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])  # slots per sequence
    num_new = 0 if k is None else k.shape[1]
    longest = capacity  # positions the longest sequence holds after the append (an upper bound off CPU)
    if isinstance(cache_seqlens, torch.Tensor):
        if q.device.type == "cpu" and cache_seqlens.numel() and not torch.compiler.is_compiling():
            low, high = (int(bound) for bound in torch.aminmax(cache_seqlens))
            if low < 0 or high + num_new > capacity:
                raise ValueError(
                    f"cache_seqlens must lie in [0, {capacity - num_new}] so that {num_new} new tokens fit the "
                    f"cache's {capacity} slots per sequence, got [{low}, {high}]"
                )
            longest = high + num_new
    elif cache_seqlens is not None:
        longest = check_int("cache_seqlens", cache_seqlens, low=0, high=capacity - num_new) + num_new
    check_attention_options(softmax_scale, causal, window_size)
    if block_table is not None:
        _check_used_blocks(block_table, k_cache.shape[0], k_cache.shape[1], cache_seqlens, num_new, longest)
    return FLASH_ATTN_WITH_KVCACHE(
        q.device, q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, tuple(window_size)
    )
