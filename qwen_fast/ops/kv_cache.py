"""reshape_and_cache_flash (vLLM's name and signature) and reshape_and_cache (qwen_fast's name of the same write):
new K/V rows into the paged pools [num_blocks, block_size, Hkv, D].

vLLM has two writes: `reshape_and_cache_flash` (this layout, the one qwen_fast and flash-attn's paged attention use)
and `reshape_and_cache` (key_cache [num_blocks, Hkv, D / x, block_size, x], value_cache [num_blocks, Hkv, D,
block_size]). qwen_fast.reshape_and_cache takes vLLM's reshape_and_cache signature but writes the flash layout: a
vLLM-style call with the 5-D key cache is refused with a shape error naming that layout, never reinterpreted.
Only kv_cache_dtype="auto" is supported (the cache holds key's dtype; the scales are unused then, as in vLLM); an
fp8 cache is refused with an error that says so.
"""

import torch

from qwen_fast.reference import kv_cache as reference

from ._checks import (
    FLOAT_DTYPES,
    Require,
    check_last_dim_contiguous,
    check_shape,
    check_tensor,
    raise_unless,
    same_sizes,
    traced,
)
from ._dispatch import NATIVE_FIRST, Op
from ._library import define_triton_op, launcher, native_op


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


def _check_vllm_options(kv_cache_dtype: object, k_scale: object, v_scale: object) -> None:
    if not isinstance(kv_cache_dtype, str):
        raise TypeError(f"kv_cache_dtype must be a str, got {type(kv_cache_dtype).__name__} {kv_cache_dtype!r}")
    if kv_cache_dtype != "auto":
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} is not supported: qwen_fast's caches hold the model dtype (fp8 KV "
            "caches are not implemented); pass 'auto'"
        )
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is not None and not isinstance(scale, (torch.Tensor, float, int)):
            raise TypeError(f"{name} must be a tensor, a float or None, got {type(scale).__name__}")


def reshape_and_cache_flash(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
) -> None:
    """Write new keys and values into the paged caches, in place (vLLM's `reshape_and_cache_flash`).

    Args:
        key: [N, Hkv, D] float32/float16/bfloat16, one row per new token.
        value: [N, Hkv, D], key's dtype and strides.
        key_cache: [num_blocks, block_size, Hkv, D], key's dtype; mutated.
        value_cache: key_cache's shape, dtype and strides; mutated.
        slot_mapping: [N] int64; token i goes to block slot // block_size at offset slot % block_size. A negative
            slot is skipped (padding). Slots past the pool are an error (checked on CPU; on CUDA the check would
            need a host sync and is skipped).
        kv_cache_dtype: "auto" only (fp8 caches are refused). k_scale, v_scale: unused with "auto" (as in vLLM).

    Example:
        >>> kc = torch.zeros(4, 16, 2, 64); vc = torch.zeros_like(kc)
        >>> k = torch.randn(3, 2, 64); v = torch.randn(3, 2, 64)
        >>> qwen_fast.reshape_and_cache_flash(k, v, kc, vc, torch.tensor([0, 17, -1]), "auto", None, None)
        >>> torch.equal(kc[1, 1], k[1])
        True
    """
    _check_vllm_options(kv_cache_dtype, k_scale, v_scale)
    if isinstance(key_cache, torch.Tensor) and key_cache.dim() == 5:
        raise ValueError(
            f"key_cache has 5 dimensions {tuple(key_cache.shape)}: vLLM's reshape_and_cache layout [num_blocks, Hkv, "
            "D / x, block_size, x] is not supported; qwen_fast writes [num_blocks, block_size, Hkv, D] "
            "(reshape_and_cache_flash's layout)"
        )
    check_cache_write_args(key, value, key_cache, value_cache, slot_mapping)
    device = key.device
    if device.type == "cpu" and slot_mapping.numel() and not torch.compiler.is_compiling():
        capacity = key_cache.shape[0] * key_cache.shape[1]
        last = int(slot_mapping.max())
        if last >= capacity:
            raise ValueError(f"slot_mapping holds slot {last}, past the cache's {capacity} slots")
    RESHAPE_AND_CACHE(device, key, value, key_cache, value_cache, slot_mapping)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    interleaved_v: bool = False,
) -> None:
    """qwen_fast's name for `reshape_and_cache_flash` (same layout [num_blocks, block_size, Hkv, D], same write),
    with vLLM's `reshape_and_cache` signature. vLLM's own reshape_and_cache layout (5-D key cache) is refused with a
    shape error, and interleaved_v=True (a vLLM value layout) with a ValueError.

    Example:
        >>> kc = torch.zeros(4, 16, 2, 64); vc = torch.zeros_like(kc)
        >>> k = torch.randn(3, 2, 64); v = torch.randn(3, 2, 64)
        >>> qwen_fast.reshape_and_cache(k, v, kc, vc, torch.tensor([0, 17, -1]))
        >>> torch.equal(kc[1, 1], k[1])
        True
    """
    if interleaved_v is not False:
        raise ValueError(f"interleaved_v={interleaved_v!r} is not supported (a vLLM value layout); pass False")
    reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
