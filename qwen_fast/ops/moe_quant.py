"""The quantization arguments of fused_experts' op: the contract of the scales and block_shape for each weight
format (formats: qwen_fast.reference.quant), shared by the public functions (eager) and the op's fake (traced)."""

import torch

from qwen_fast.reference.quant import FP8, QUANTIZED_DTYPES, scale_shape

from ._checks import Require, check_shape, check_tensor, raise_unless


def check_block_shape(block_shape: object, require: Require = raise_unless) -> None:
    """block_shape: a list or tuple of two ints [bn, bk] >= 1 (fp8's block along the output rows, then the
    reduction)."""
    require(
        isinstance(block_shape, (list, tuple)) and all(type(v) is int for v in block_shape),
        TypeError,
        lambda: f"block_shape must be a list of two ints [bn, bk], got {block_shape!r}",
    )
    require(
        len(block_shape) == 2 and min(block_shape, default=0) >= 1,
        ValueError,
        lambda: f"block_shape must be [bn, bk] with bn, bk >= 1, got {list(block_shape)}",
    )


def check_expert_scales(
    w13: torch.Tensor, w2: torch.Tensor, w13_scale: object, w2_scale: object, block_shape: object,
    require: Require = raise_unless,
) -> None:  # fmt: skip
    """The scales of w13 [E, 2I, H] and w2 [E, H, I] (already checked: one dtype, one device):
    - unquantized weights: w1_scale, w2_scale and block_shape None;
    - float8_e4m3fn: block_shape [bn, bk]; w1_scale [E, ceil(2I/bn), ceil(H/bk)], w2_scale [E, ceil(H/bn),
      ceil(I/bk)];
    - int8: block_shape None; w1_scale [E, 2I], w2_scale [E, H];
    the scales fp32 (any strides), on the weights' device. (The public API names w13 "w1", as vLLM.)"""
    dtype = w13.dtype
    if dtype not in QUANTIZED_DTYPES:
        for name, value in (("w1_scale", w13_scale), ("w2_scale", w2_scale), ("block_shape", block_shape)):
            require(
                value is None,
                ValueError,
                lambda name=name: f"{name} was given for unquantized weights ({dtype}): scales are for fp8 or int8",
            )
        return
    if dtype == FP8:
        require(
            block_shape is not None,
            ValueError,
            lambda: "float8_e4m3fn weights need block_shape [bn, bk] (per-tensor fp8 scales are not supported)",
        )
        check_block_shape(block_shape, require)
        names = "[E, ceil(2I/bn), ceil(H/bk)] =", "[E, ceil(H/bn), ceil(I/bk)] ="
    else:
        require(
            block_shape is None,
            ValueError,
            lambda: f"int8 weights have per-channel scales: block_shape must be None, got {block_shape!r}",
        )
        names = "[E, 2I] =", "[E, H] ="
    for name, scale, weight, what in (("w1_scale", w13_scale, w13, names[0]), ("w2_scale", w2_scale, w2, names[1])):
        require(scale is not None, ValueError, lambda name=name: f"{name} is required for {dtype} weights (fp32)")
        check_tensor(name, scale, dtypes=(torch.float32,), device=w13.device, require=require)
        check_shape(name, scale, scale_shape(weight.shape, dtype, block_shape), what, require)
