"""reshape_and_cache_flash (vLLM's name and signature) and reshape_and_cache (qwen_fast's name of the same write):
new K/V rows into the paged pools [num_blocks, block_size, Hkv, D].

vLLM has two writes: `reshape_and_cache_flash` (this layout, the one qwen_fast and flash-attn's paged attention use)
and `reshape_and_cache` (key_cache [num_blocks, Hkv, D / x, block_size, x], value_cache [num_blocks, Hkv, D,
block_size]). qwen_fast.reshape_and_cache takes vLLM's reshape_and_cache signature but writes the flash layout: a
vLLM-style call with the 5-D key cache is refused with a shape error naming that layout, never reinterpreted.
kv_cache_dtype "auto": the caches hold key's dtype (the scales are unused, as in vLLM). "fp8" / "fp8_e4m3": the
caches are float8_e4m3fn (or uint8 holding its bits, as vLLM allocates them, viewed as e4m3 here) and each element
is stored as fp8(clamp(x / scale, -448, 448)) with k_scale / v_scale one-element fp32 tensors, on every backend.
"fp8_e5m2" is refused.
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


def check_cache_write_args(
    key, value, key_cache, value_cache, slot_mapping, k_scale=None, v_scale=None, require: Require = raise_unless
) -> None:
    """reshape_and_cache's contract (the eager check and the fake; `require`: see _checks.py). With k_scale and
    v_scale (fp32, one element each) the caches are float8_e4m3fn, else key's dtype."""
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES, require=require)
    device = key.device
    check_tensor("value", value, dtypes=(key.dtype,), device=device, require=require)
    check_shape("value", value, key.shape, "[N, Hkv, D] = key's shape", require)
    cache_dtype = key.dtype if k_scale is None else torch.float8_e4m3fn
    check_tensor("key_cache", key_cache, ndim=4, dtypes=(cache_dtype,), device=device, require=require)
    check_tensor("value_cache", value_cache, dtypes=(cache_dtype,), device=device, require=require)
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if k_scale is not None:
            check_tensor(name, scale, dtypes=(torch.float32,), device=device, require=require)
            message = f"{name} must hold one element, got {{}}"
            require(scale.numel() == 1, ValueError, lambda m=message, t=scale: m.format(tuple(t.shape)))
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


def _fake_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    check_cache_write_args(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, traced)


def _reshape_and_cache_reference(key, value, key_cache, value_cache, slot_mapping, k_scale=None, v_scale=None):
    dtype = "auto" if k_scale is None else "fp8"
    reference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, dtype, k_scale, v_scale)


_reshape_and_cache_triton = define_triton_op(
    "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping, "
    "Tensor? k_scale=None, Tensor? v_scale=None) -> ()",
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
        "torch": _reshape_and_cache_reference,
    },
    NATIVE_FIRST,
)


def _is_uint8(cache: object) -> bool:
    return isinstance(cache, torch.Tensor) and cache.dtype == torch.uint8


def _check_vllm_options(kv_cache_dtype: object, k_scale: object, v_scale: object) -> bool:
    """Whether the caches are fp8 (kv_cache_dtype "fp8" / "fp8_e4m3"); other values are refused."""
    if not isinstance(kv_cache_dtype, str):
        raise TypeError(f"kv_cache_dtype must be a str, got {type(kv_cache_dtype).__name__} {kv_cache_dtype!r}")
    if kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} is not supported: pass 'auto' (the model dtype) or 'fp8' / 'fp8_e4m3'"
        )
    fp8 = kv_cache_dtype != "auto"
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if fp8 and not isinstance(scale, torch.Tensor):
            raise TypeError(f"{name} must be an fp32 tensor of one element with kv_cache_dtype='fp8', got {scale!r}")
        if scale is not None and not isinstance(scale, (torch.Tensor, float, int)):
            raise TypeError(f"{name} must be a tensor, a float or None, got {type(scale).__name__}")
    return fp8


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
        kv_cache_dtype: "auto" (the caches hold key's dtype) or "fp8" / "fp8_e4m3": float8_e4m3fn (or uint8)
            caches holding fp8(clamp(x / scale, -448, 448)) (vLLM's saturating cast; the division in fp32).
        k_scale, v_scale: fp32 tensors of one element with "fp8"; unused with "auto" (as in vLLM).

    Example:
        >>> kc = torch.zeros(4, 16, 2, 64); vc = torch.zeros_like(kc)
        >>> k = torch.randn(3, 2, 64); v = torch.randn(3, 2, 64)
        >>> qwen_fast.reshape_and_cache_flash(k, v, kc, vc, torch.tensor([0, 17, -1]), "auto", None, None)
        >>> torch.equal(kc[1, 1], k[1])
        True
    """
    fp8 = _check_vllm_options(kv_cache_dtype, k_scale, v_scale)
    if fp8:  # vLLM allocates fp8 caches as uint8
        key_cache, value_cache = (c.view(torch.float8_e4m3fn) if _is_uint8(c) else c for c in (key_cache, value_cache))
    else:
        k_scale = v_scale = None
    if isinstance(key_cache, torch.Tensor) and key_cache.dim() == 5:
        raise ValueError(
            f"key_cache has 5 dimensions {tuple(key_cache.shape)}: vLLM's reshape_and_cache layout [num_blocks, Hkv, "
            "D / x, block_size, x] is not supported; qwen_fast writes [num_blocks, block_size, Hkv, D] "
            "(reshape_and_cache_flash's layout)"
        )
    check_cache_write_args(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    device = key.device
    if device.type == "cpu" and slot_mapping.numel() and not torch.compiler.is_compiling():
        capacity = key_cache.shape[0] * key_cache.shape[1]
        last = int(slot_mapping.max())
        if last >= capacity:
            raise ValueError(f"slot_mapping holds slot {last}, past the cache's {capacity} slots")
    RESHAPE_AND_CACHE(device, key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    *,
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
