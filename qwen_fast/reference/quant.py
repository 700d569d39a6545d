"""Quantized expert weights: the two formats fused_experts reads, dequantized (the specification every kernel
matches) and quantized (plain PyTorch, the one place qwen_fast makes them).

Both formats hold weights [..., N, K] (N output rows, K the reduction: w13 [E, 2I, H], w2 [E, H, I]):

- fp8 block-scaled (Qwen3-*-FP8 and DeepSeek-V3 checkpoints, transformers' FP8Experts): w float8_e4m3fn, scale
  fp32 [..., ceil(N / bn), ceil(K / bk)] for block_shape [bn, bk] ([128, 128] in real checkpoints; the last block
  of a dimension may be partial). W[n, k] = float(w[n, k]) * scale[n // bn, k // bk] (transformers'
  `*_scale_inv`).
- int8 weight-only, symmetric, per output channel: w int8 in [-127, 127], scale fp32 [..., N].
  W[n, k] = float(w[n, k]) * scale[n].

The experts then run in hidden_states' dtype (w8a16): W is dequantized in fp32 and rounded once to that dtype, which
is what transformers computes on CPU for an FP8 checkpoint (it dequantizes at load, `Fp8Dequantize`:
(float32(w) * float32(scale)).to(model dtype); its FP8Experts module has no CPU kernel), then the unquantized math of
qwen_fast.reference.moe. Kernels dequantize in registers (fp32) without that rounding: within the dtype's tolerance.

Quantizing: fp8 scale = amax(|W| over the block) / 448 (the largest e4m3 value; 1 for an all-zero block), w = W /
scale rounded to nearest e4m3; int8 scale = amax(|W| over the row) / 127 (1 for a zero row), w = round(W / scale)
(to nearest, ties to even). Both compute in fp32.
"""

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT8_MAX = 127
QUANTIZED_DTYPES = (FP8, torch.int8)
DEFAULT_BLOCK_SHAPE = (128, 128)


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether `weight` holds one of the quantized formats (its dtype says which)."""
    return weight.dtype in QUANTIZED_DTYPES


def scale_shape(weight_shape: torch.Size | tuple, dtype: torch.dtype, block_shape=None) -> tuple:
    """The scale's shape for weights of `weight_shape` [..., N, K] in `dtype`: [..., ceil(N/bn), ceil(K/bk)] for fp8
    with block_shape [bn, bk], [..., N] for int8."""
    *lead, rows, cols = weight_shape
    if dtype == FP8:
        bn, bk = block_shape
        return (*lead, (rows + bn - 1) // bn, (cols + bk - 1) // bk)
    return (*lead, rows)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block_shape=None) -> torch.Tensor:
    """The fp32 weights W of `weight` (fp8 with block_shape [bn, bk], or int8 per channel) and its fp32 `scale`.

    Args:
        weight: [..., N, K] float8_e4m3fn or int8.
        scale: fp32, [..., ceil(N/bn), ceil(K/bk)] (fp8) or [..., N] (int8).
        block_shape: [bn, bk] for fp8; None for int8.

    Returns:
        [..., N, K] float32.

    Example:
        >>> weight = torch.randn(4, 32, 16)
        >>> w, scale = quantize_fp8(weight, block_shape=(16, 16))
        >>> bool((dequantize(w, scale, (16, 16)) - weight).abs().max() <= weight.abs().max() / 16)
        True
    """
    values = weight.float()
    if weight.dtype == torch.int8:
        return values * scale.float()[..., None]
    rows, cols = weight.shape[-2:]
    bn, bk = block_shape
    expanded = scale.float().repeat_interleave(bn, dim=-2)[..., :rows, :].repeat_interleave(bk, dim=-1)
    return values * expanded[..., :cols]


def quantize_fp8(weight: torch.Tensor, block_shape=DEFAULT_BLOCK_SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled fp8 of `weight` [..., N, K] (any float dtype): (w float8_e4m3fn [..., N, K], scale fp32
    [..., ceil(N/bn), ceil(K/bk)]), each block's largest |W| mapped to 448.

    Example:
        >>> w, scale = quantize_fp8(torch.randn(2, 40, 24), block_shape=(16, 16))
        >>> w.dtype, tuple(scale.shape)
        (torch.float8_e4m3fn, (2, 3, 2))
    """
    bn, bk = block_shape
    rows, cols = weight.shape[-2:]
    pad_rows, pad_cols = -rows % bn, -cols % bk
    values = torch.nn.functional.pad(weight.float(), (0, pad_cols, 0, pad_rows))  # zeros: no effect on amax
    blocks = values.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn))  # [..., N/bn, bn, K/bk, bk]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., N/bn, K/bk]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    expanded = scale.repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)[..., :rows, :cols]
    quantized = (weight.float() / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale.contiguous()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of `weight` [..., N, K] (any float dtype): (w int8 [..., N, K] in
    [-127, 127], scale fp32 [..., N]), each row's largest |W| mapped to 127, round to nearest.

    Example:
        >>> w, scale = quantize_int8(torch.tensor([[0.5, -1.0], [3.0, 0.0]]))
        >>> w, scale
        (tensor([[  64, -127],
                [ 127,    0]], dtype=torch.int8), tensor([0.0079, 0.0236]))
    """
    values = weight.float()
    amax = values.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    quantized = torch.round(values / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scale.contiguous()
