"""Input checks at the functional API's boundary: named, value-bearing ValueError/TypeError messages."""

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """`value` is a tensor with `ndim` dims, one of `dtypes`, on `device`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be {allowed}, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {value.device}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int], what: str) -> None:
    """`value.shape == expected`; `what` names the dims, e.g. "[N, Hkv, D] = key's shape"."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must be {what} {tuple(expected)}, got {tuple(value.shape)}")


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """`value` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return value


def check_last_dim_contiguous(name: str, value: torch.Tensor) -> None:
    if value.dim() and value.stride(-1) != 1 and value.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {value.stride()}")
