"""linear: the decode step's dense projections (q/k/v/o, the LM head) at a few rows, F.linear's signature.

On CPU tensors the cpu backend's kernel (csrc/cpu/linear.cpp) reads the weights once, in place, in the model dtype, with
fp32 accumulation, split over the threads by output column. The contract for many rows: the kernel is right for any row
count, and it is the fast path up to MAX_ROWS rows (decode); from about there on ATen's packed GEMM is faster, so
qwen_fast's modules call the op only for at most MAX_ROWS rows (in fp32 for now: qwen_fast/nn/linear.py DECODE_ROWS) and
F.linear above (prefill), and a forced cpu backend runs a whole model. The op itself takes every row count on every
backend: no per-call limit, whose check would cost two Python calls per projection in the decode step. On CUDA the torch
backend (cuBLAS) is the op's only one: a GEMV there is cuBLAS's job.
"""

import torch

from qwen_fast.reference.linear import linear as reference_linear

from ._checks import FLOAT_DTYPES, Require, check_shape, check_tensor, raise_unless, traced
from ._dispatch import Op
from ._library import native_op

MAX_ROWS = 16  # the modules' limit for the op (decode: batch x new tokens): the kernel streams the weights once


def _check_linear_args(input: object, weight: object, bias: object, require: Require = raise_unless) -> None:
    """input [*, K], weight [N, K], bias [N] or None: one float dtype, one device."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES, require=require)
    require(input.dim() >= 1, ValueError, lambda: "input must be [*, K] (at least 1 dimension), got shape ()")
    check_tensor("weight", weight, ndim=2, dtypes=(input.dtype,), device=input.device, require=require)
    require(
        weight.shape[1] == input.shape[-1],
        ValueError,
        lambda: f"weight [N, K] = {tuple(weight.shape)} must match input [*, K] = {tuple(input.shape)} in K",
    )
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(input.dtype,), device=input.device, require=require)
        check_shape("bias", bias, (weight.shape[0],), "[N] from weight [N, K] =", require)


def _fake_linear(input, weight, bias=None) -> torch.Tensor:
    _check_linear_args(input, weight, bias, traced)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


_linear_native = native_op("linear", _fake_linear)

# The op's arguments: (input, weight, bias=None).
LINEAR = Op(
    "linear",
    {"cpu": _linear_native, "torch": reference_linear},
    {"cuda": ("torch",), "cpu": ("cpu", "torch")},
)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """input [*, K] . weight [N, K]^T (+ bias [N]) -> [*, N] (torch.nn.functional.linear's signature and result).

    Args:
        input: [*, K] float32, bfloat16 or float16 (any strides).
        weight: [N, K] in input's dtype, read in place (any strides; row-major is the fast layout).
        bias: [N] in input's dtype, or None.

    Returns:
        [*, N] in input's dtype: fp32 sums rounded once (qwen_fast.reference.linear). The cpu kernel is the fast
        path for at most MAX_ROWS (16) rows, F.linear above (see the module docstring).

    Example:
        >>> x, w = torch.randn(1, 64), torch.randn(96, 64)
        >>> with qwen_fast.record_backends() as ran:
        ...     out = qwen_fast.linear(x, w)
        >>> out.shape, torch.allclose(out, x @ w.T, atol=1e-4), ran
        (torch.Size([1, 96]), True, [('linear', 'cpu')])
    """
    _check_linear_args(input, weight, bias)
    return LINEAR(input.device, input, weight, bias)
