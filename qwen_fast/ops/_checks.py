"""Input checks: named, value-bearing ValueError/TypeError messages at the functional API's boundary, and the same
conditions as torch._check in the ops' fakes.

Each op states its tensor contract once, as a function of its arguments and a `require(ok, error, message)`: the
public function passes `raise_unless` (eager: `error(message())` when not ok) and the op's fake passes `traced`
(torch._check: a concrete False raises at once, a symbolic condition becomes a runtime assert instead of a guard).
Conditions on sizes combine with & and | (and same_sizes), never `and`/`or`, so that symbolic sizes stay symbolic
(bool() of a symbolic condition would add a guard). Checks of tensor values (index ranges, offsets) need the data:
they are the public functions' alone (on CPU, outside torch.compile).
"""

from collections.abc import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

Require = Callable[[object, type[Exception], Callable[[], str]], None]


def same_sizes(a: Sequence, b: Sequence) -> object:
    """a == b, element by element (ints or SymInts): a bool, or a symbolic condition."""
    if len(a) != len(b):
        return False
    equal = True
    for x, y in zip(a, b):  # noqa: B905 (lengths checked above)
        equal = equal & (x == y)
    return equal


def raise_unless(ok: object, error: type[Exception], message: Callable[[], str]) -> None:
    """The eager `require`: raise `error(message())` when `ok` is false."""
    if not ok:
        raise error(message())


def traced(ok: object, error: type[Exception], message: Callable[[], str]) -> None:
    """The fakes' `require`: torch._check (the error type is torch's)."""
    torch._check(ok, message)


# The helpers below build their messages only when a condition is not plainly True (a failure, or a symbolic
# condition under tracing): the checks run on every public call, so a passing one costs its comparison alone.


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    require: Require = raise_unless,
) -> torch.Tensor:
    """`value` is a tensor with `ndim` dims, one of `dtypes`, on `device` (conditions that are never symbolic)."""
    if (
        isinstance(value, torch.Tensor)
        and (ndim is None or value.dim() == ndim)
        and (dtypes is None or value.dtype in dtypes)
        and (device is None or value.device == device)
    ):
        return value
    require(
        isinstance(value, torch.Tensor), TypeError, lambda: f"{name} must be a torch.Tensor, got {type(value).__name__}"
    )
    require(
        ndim is None or value.dim() == ndim,
        ValueError,
        lambda: f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}",
    )
    require(
        dtypes is None or value.dtype in dtypes,
        TypeError,
        lambda: f"{name} must be {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}, got {value.dtype}",
    )
    require(
        device is None or value.device == device,
        ValueError,
        lambda: f"{name} must be on {device} like the other inputs, got {value.device}",
    )
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence, what: str, require: Require = raise_unless) -> None:
    """`value.shape == expected`; `what` names the dims, e.g. "[N, Hkv, D] = key's shape"."""
    ok = same_sizes(value.shape, expected)
    if ok is not True:
        require(ok, ValueError, lambda: f"{name} must be {what} {tuple(expected)}, got {tuple(value.shape)}")


def check_int(
    name: str, value: object, *, low: int | None = None, high: int | None = None, require: Require = raise_unless
) -> int:
    """`value` is an int (not a bool) in [low, high]."""
    require(
        not isinstance(value, bool) and isinstance(value, (int, torch.SymInt)),
        TypeError,
        lambda: f"{name} must be an int, got {type(value).__name__} {value!r}",
    )
    ok = (True if low is None else value >= low) & (True if high is None else value <= high)
    if ok is not True:
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        require(ok, ValueError, lambda: f"{name} must be in {bounds}, got {value}")
    return value


def check_last_dim_contiguous(name: str, value: torch.Tensor, require: Require = raise_unless) -> None:
    ok = value.dim() == 0 or (value.stride(-1) == 1) | (value.shape[-1] <= 1)
    if ok is not True:
        message = f"{name} must be contiguous in its last dimension, got strides {{}}"
        require(ok, ValueError, lambda: message.format(value.stride()))
