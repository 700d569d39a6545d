"""flash_attn_with_kvcache's argument checks: the tensor contract (eager and in the fakes), the values of the index
tensors (CPU tensors, eager: on CUDA they would need a host sync), the options, fp8 caches and rotary tables."""

import torch

from ._checks import FLOAT_DTYPES, Require, check_int, check_shape, check_tensor, raise_unless
from .attention import check_heads

# An fp8 cache: e4m3 values, or their bits as uint8 (how vLLM allocates them, and how the kernels' ops get them: the
# dispatcher's bf16 interpreter limit looks at floating-point arguments, which fp8 pages are not about).
FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.uint8)


class BlockTableTooSmallError(RuntimeError, ValueError):
    """A block table with fewer slots than cache_seqlens (+ the new tokens) needs. flash-attn raises RuntimeError
    there; this is one (and a ValueError, qwen_fast's convention for bad input)."""


def check_kvcache_args(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx=None, cache_leftpad=None,
    k_descale=None, v_descale=None, require: Require = raise_unless,
) -> None:  # fmt: skip
    """flash_attn_with_kvcache's tensor contract (the eager check and the fakes, which get cache_seqlens and
    block_table as the kernels take them; `require`: see _checks.py). cache_seqlens may be an int or None here.
    With k_descale / v_descale (fp32 [B, Hkv]) the caches are float8_e4m3fn or uint8 holding its bits, else q's
    dtype."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, require=require)
    batch, device = q.shape[0], q.device
    cache_dtypes = (q.dtype,) if k_descale is None else FP8_CACHE_DTYPES
    check_tensor("k_cache", k_cache, ndim=4, dtypes=cache_dtypes, device=device, require=require)
    check_tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), device=device, require=require)
    for name, descale in (("k_descale", k_descale), ("v_descale", v_descale)):
        if k_descale is not None:
            check_tensor(name, descale, ndim=2, dtypes=(torch.float32,), device=device, require=require)
            check_shape(name, descale, (batch, k_cache.shape[2]), "[B, Hkv] =", require)
    require(
        k_descale is None or k is None,
        ValueError,
        lambda: (
            "new k/v cannot be appended to an fp8 cache here: write them with reshape_and_cache_flash(..., 'fp8', "
            "k_scale, v_scale) first"
        ),
    )
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


def on_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.numel() > 0 and not torch.compiler.is_compiling()


def lengths_known(cache_seqlens) -> bool:
    """Whether the host knows cache_seqlens' values without a sync (an int, None: the whole cache, a CPU tensor)."""
    return not isinstance(cache_seqlens, torch.Tensor) or on_host(cache_seqlens)


def check_lengths(cache_seqlens, num_new: int, capacity: int, paged: bool, table_shape, block_size: int) -> int:
    """cache_seqlens + num_new fits each sequence's capacity; returns the longest sequence after the append (the
    capacity when unknown). A paged overflow names block_table (flash-attn's convention: a RuntimeError)."""
    if isinstance(cache_seqlens, torch.Tensor):
        if not on_host(cache_seqlens):
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


def check_used_blocks(block_table, num_blocks, block_size, cache_seqlens, num_new, longest) -> None:
    """The block_table entries a sequence uses lie in [0, num_blocks); entries past its length may hold anything.
    `longest`: the most positions a sequence holds after the append. One min/max over the columns the longest
    sequence uses; the per-row mask of used entries is built only when that finds an entry out of range (it may
    belong to a shorter sequence, which does not use it)."""
    if not on_host(block_table):
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


def check_index_values(cache_batch_idx, cache_leftpad, cache_seqlens, num_rows: int, capacity: int) -> None:
    if cache_batch_idx is not None and on_host(cache_batch_idx):
        low, high = (int(bound) for bound in torch.aminmax(cache_batch_idx))
        if low < 0 or high >= num_rows:
            raise ValueError(f"cache_batch_idx holds [{low}, {high}], outside the cache's rows [0, {num_rows})")
    if cache_leftpad is not None and on_host(cache_leftpad):
        ends = capacity if cache_seqlens is None else torch.as_tensor(cache_seqlens)
        bad = (cache_leftpad < 0) | (cache_leftpad > ends)
        if bad.any():
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache_leftpad[{b}] = {int(cache_leftpad[b])} must lie in [0, cache_seqlens[{b}]]")


def check_options(softcap: object, alibi_slopes: object, num_splits: object, flags: dict) -> float:
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


def fp8_cache(q, k_cache, v_cache, k_descale, v_descale) -> tuple:
    """(k_cache, v_cache, k_descale, v_descale) as the ops take them: fp8 caches as their uint8 bits, the descales
    expanded to contiguous fp32 [B, Hkv]; checks that fp8 caches and descales go together."""
    caches = [c.view(torch.uint8) if isinstance(c, torch.Tensor) and c.dtype == torch.float8_e4m3fn else c
              for c in (k_cache, v_cache)]  # fmt: skip
    fp8 = isinstance(caches[0], torch.Tensor) and caches[0].dtype == torch.uint8
    if isinstance(caches[0], torch.Tensor) and caches[0].dtype == torch.float8_e5m2:
        raise TypeError("k_cache is float8_e5m2: only e4m3 fp8 caches (kv_cache_dtype 'fp8') are supported")
    if not fp8:
        if k_descale is not None or v_descale is not None:
            raise ValueError("k_descale / v_descale are for an fp8 cache (float8_e4m3fn or uint8), got k_cache "
                             f"{getattr(k_cache, 'dtype', type(k_cache).__name__)}")  # fmt: skip
        return k_cache, v_cache, None, None
    descales = []
    for name, descale in (("k_descale", k_descale), ("v_descale", v_descale)):
        if not isinstance(descale, torch.Tensor) or descale.dtype != torch.float32:
            raise TypeError(f"an fp8 cache needs {name}, an fp32 tensor [B, Hkv] or of one element, got {descale!r}")
        shape = (q.shape[0], caches[0].shape[2]) if caches[0].dim() == 4 and q.dim() == 4 else None
        if shape is not None and descale.numel() == 1:
            descale = descale.reshape(1, 1).expand(shape)
        descales.append(descale.contiguous() if shape is not None and descale.shape == shape else descale)
    return (*caches, *descales)


def check_rotary(rotary_cos, rotary_sin, q, k, capacity: int) -> None:
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
