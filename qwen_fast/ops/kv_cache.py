"""Paged KV cache ops: reshape_and_cache (write new K/V into the block pool) and flash_attn_with_kvcache."""

import torch

from qwen_fast import _native
from qwen_fast.reference import kv_cache as reference

from ._checks import FLOAT_DTYPES, check_last_dim_contiguous, check_shape, check_tensor
from ._dispatch import NATIVE_FIRST, Op


def _fake_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    torch._check(key.dim() == 3, lambda: f"key must be [N, Hkv, D], got {tuple(key.shape)}")
    torch._check(key_cache.dim() == 4, lambda: f"key_cache must be 4-D, got {tuple(key_cache.shape)}")
    torch._check(value.shape == key.shape, lambda: f"value {tuple(value.shape)} != key {tuple(key.shape)}")
    torch._check(value_cache.shape == key_cache.shape, lambda: "value_cache must have key_cache's shape")
    torch._check(key_cache.shape[2:] == key.shape[1:], lambda: "key_cache [.., Hkv, D] must match key [N, Hkv, D]")
    torch._check(slot_mapping.shape == key.shape[:1], lambda: "slot_mapping must be [N]")
    torch._check(slot_mapping.dtype == torch.int64, lambda: f"slot_mapping must be int64, got {slot_mapping.dtype}")


if _native.LOAD_ERROR is None:
    torch.library.register_fake("qwen_fast::reshape_and_cache")(_fake_reshape_and_cache)


@torch.library.custom_op("qwen_fast_triton::reshape_and_cache", mutates_args=("key_cache", "value_cache"))
def _reshape_and_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    from qwen_fast.kernels.kv_cache import reshape_and_cache as launch

    launch(key, value, key_cache, value_cache, slot_mapping)


_reshape_and_cache_triton.register_fake(_fake_reshape_and_cache)


def _reshape_and_cache_native(key, value, key_cache, value_cache, slot_mapping) -> None:
    torch.ops.qwen_fast.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


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
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES)
    device = key.device
    check_tensor("value", value, dtypes=(key.dtype,), device=device)
    check_shape("value", value, key.shape, "[N, Hkv, D] = key's shape")
    check_tensor("key_cache", key_cache, ndim=4, dtypes=(key.dtype,), device=device)
    check_tensor("value_cache", value_cache, dtypes=(key.dtype,), device=device)
    check_shape("value_cache", value_cache, key_cache.shape, "[num_blocks, block_size, Hkv, D] = key_cache's shape")
    if key_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"key_cache [num_blocks, block_size, Hkv, D] = {tuple(key_cache.shape)} does not match key [N, Hkv, D] = "
            f"{tuple(key.shape)} in Hkv and D"
        )
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=device)
    check_shape("slot_mapping", slot_mapping, key.shape[:1], "[N] with N = key.shape[0] =")
    for name, tensor in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        check_last_dim_contiguous(name, tensor)
    if value.stride() != key.stride() or value_cache.stride() != key_cache.stride():
        raise ValueError(
            f"value and value_cache must have the strides of key and key_cache, got {value.stride()} vs "
            f"{key.stride()} and {value_cache.stride()} vs {key_cache.stride()}"
        )
    if device.type == "cpu" and slot_mapping.numel() and not torch.compiler.is_compiling():
        capacity = key_cache.shape[0] * key_cache.shape[1]
        last = int(slot_mapping.max())
        if last >= capacity:
            raise ValueError(f"slot_mapping holds slot {last}, past the cache's {capacity} slots")
    RESHAPE_AND_CACHE(device, key, value, key_cache, value_cache, slot_mapping)
