"""The cpu kernel of fused_experts with quantized experts (csrc/cpu/moe.cpp), called directly through
torch.ops.qwen_fast.fused_experts: fp8 e4m3 block-scaled and int8 per-channel weights against the reference experts
on the dequantized weights (fp32 W = float(w) * scale, rounded to the activation dtype), every tile form, block
shapes that do not divide H or I, strided weights and scales, thread-count determinism, and the op's own checks.

The quantization here is the test's own (amax scaling, as the formats define it); the public API and the Python
side of the quantized formats are tested in tests/test_moe.py.
"""

import pytest
import torch
from numerics import assert_close

import qwen_fast
from qwen_fast.reference.moe import experts

FP8 = torch.float8_e4m3fn
pytestmark = pytest.mark.skipif(qwen_fast._native.LOAD_ERROR is not None, reason="the C++ extension is not built")


def quantize(weight: torch.Tensor, fmt: str, block_shape=None):
    """(w, scale): fp8 with one fp32 scale per [bn, bk] block (amax -> 448), or int8 per row (amax -> 127)."""
    if fmt == "int8":
        scale = weight.abs().amax(-1) / 127
        return torch.round(weight / scale[..., None]).clamp(-127, 127).to(torch.int8), scale
    bn, bk = block_shape
    blocks = torch.nn.functional.pad(weight, (0, -weight.shape[-1] % bk, 0, -weight.shape[-2] % bn))
    scale = blocks.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn)).abs().amax((-3, -1)) / 448
    return (weight / _expand(scale, weight.shape, block_shape)).to(FP8), scale


def _expand(scale, shape, block_shape):
    if block_shape is None:
        return scale[..., None]
    bn, bk = block_shape
    return scale.repeat_interleave(bn, -2).repeat_interleave(bk, -1)[..., : shape[-2], : shape[-1]]


def dequantize(w, scale, block_shape, dtype):
    """The reference's weights: float(w) * scale in fp32, rounded to the activation dtype."""
    return (w.float() * _expand(scale, w.shape, block_shape)).to(dtype)


def _routing(case: str):
    """(T, E, topk_ids int32): one token (decode), a few rows per expert (dot tiles), or 40 rows on one expert (the
    packed outer-product tiles) beside a few on the others."""
    if case == "decode":
        return 1, 8, torch.randperm(8)[:2].view(1, 2).int()
    if case == "few":
        return 6, 8, torch.rand(6, 8).argsort(-1)[:, :3].int()
    other = torch.randint(0, 7, (40,))
    return 40, 8, torch.stack([torch.full((40,), 3), other + (other >= 3)], dim=1).int()


def _inputs(case, fmt, block_shape, dtype, hidden=72, inter=40):
    num_tokens, num_experts, ids = _routing(case)
    x = torch.randn(num_tokens, hidden).to(dtype)
    w13 = torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter) / inter**0.5
    (q13, s13), (q2, s2) = quantize(w13, fmt, block_shape), quantize(w2, fmt, block_shape)
    return x, (q13, s13), (q2, s2), torch.rand(ids.shape), ids


def _check(x, q13, s13, q2, s2, weights, ids, block_shape):
    out = torch.ops.qwen_fast.fused_experts(x, q13, q2, weights, ids, None, "silu", s13, s2, block_shape)
    assert out.shape == x.shape and out.dtype == x.dtype
    deq13, deq2 = dequantize(q13, s13, block_shape, x.dtype), dequantize(q2, s2, block_shape, x.dtype)
    assert_close(out, experts(x, deq13, deq2, weights, ids))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["decode", "few", "outer"])
@pytest.mark.parametrize("fmt,block_shape", [("fp8", [128, 128]), ("fp8", [16, 24]), ("fp8", [5, 3]),
                                             ("int8", None)])  # fmt: skip
def test_quantized_matches_dequantized_reference(fmt, block_shape, case, dtype):
    """H = 72, I = 40: [128, 128] is one partial block, [16, 24] and [5, 3] split rows and 8-lane vectors."""
    x, (q13, s13), (q2, s2), weights, ids = _inputs(case, fmt, block_shape, dtype)
    _check(x, q13, s13, q2, s2, weights, ids, block_shape)


def test_fp8_every_bit_pattern():
    """Weights made of all 254 finite e4m3 patterns (subnormals, zeros of both signs, +-448), fp32 activations: the
    decoding is exact, so the fp32 tolerance holds."""
    num_experts, hidden, inter = 2, 64, 32
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    pick = lambda n: finite[torch.randint(0, len(finite), (n,))]  # noqa: E731
    q13 = pick(num_experts * 2 * inter * hidden).view(FP8).view(num_experts, 2 * inter, hidden)
    q2 = pick(num_experts * hidden * inter).view(FP8).view(num_experts, hidden, inter)
    assert set(q13.view(torch.uint8).unique().tolist()) == set(finite.tolist())
    s13 = torch.full((num_experts, 4, 2), 1e-3) * torch.rand(num_experts, 4, 2)
    s2 = torch.full((num_experts, 4, 1), 1e-3) * torch.rand(num_experts, 4, 1)
    x = torch.randn(3, hidden)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]], dtype=torch.int32)
    _check(x, q13, s13, q2, s2, torch.rand(3, 2), ids, [16, 32])


@pytest.mark.parametrize("fmt,block_shape", [("fp8", [16, 24]), ("int8", None)])
def test_strided_weights_and_scales(fmt, block_shape):
    """Weights stored [E, H, 2I] and read transposed (column stride != 1), scales through non-unit strides."""
    x, (q13, s13), (q2, s2), weights, ids = _inputs("few", fmt, block_shape, torch.float32)
    q13 = q13.transpose(1, 2).contiguous().transpose(1, 2)
    s13 = s13.transpose(0, -1).contiguous().transpose(0, -1)
    s2 = torch.stack([s2, s2], -1)[..., 0]
    assert q13.stride(2) != 1 and s13.stride(0) == 1 and not s2.is_contiguous()
    _check(x, q13, s13, q2, s2, weights, ids, block_shape)


@pytest.mark.parametrize("fmt,block_shape", [("fp8", [16, 24]), ("int8", None)])
def test_same_bits_for_any_thread_count(fmt, block_shape):
    x, (q13, s13), (q2, s2), weights, ids = _inputs("outer", fmt, block_shape, torch.bfloat16)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.qwen_fast.fused_experts(x, q13, q2, weights, ids, None, "silu", s13, s2, block_shape))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], out) for out in outs[1:])


def _bad(fmt):
    block_shape = [16, 24] if fmt == "fp8" else None
    x, (q13, s13), (q2, s2), weights, ids = _inputs("few", fmt, block_shape, torch.bfloat16)
    return dict(x=x, q13=q13, q2=q2, weights=weights, ids=ids, s13=s13, s2=s2, block_shape=block_shape)


@pytest.mark.parametrize(
    "fmt,change,message",
    [
        ("fp8", dict(s13=None), r"w13_scale must be given for float8_e4m3fn weights \(fp32 \[8, 5, 3\]\)"),
        ("fp8", dict(block_shape=None), r"block_shape \[bn, bk\] must be given for float8_e4m3fn weights"),
        ("fp8", dict(block_shape=[0, 24]), r"block_shape must be \[bn, bk\] \(both >= 1\).*got \[0, 24\]"),
        ("fp8", dict(block_shape=[16]), r"block_shape must be \[bn, bk\].*got \[16\]"),
        ("fp8", dict(s13="half"), r"w13_scale must be fp32 \[8, 5, 3\] for float8_e4m3fn weights, got Half"),
        ("fp8", dict(s2="shape"), r"w2_scale must be fp32 \[8, 5, 2\] for float8_e4m3fn.*got Float \[8, 5, 1\]"),
        ("int8", dict(s2=None), r"w2_scale must be given for int8 weights \(fp32 \[8, 72\]\)"),
        ("int8", dict(block_shape=[16, 16]), r"block_shape must be None for int8 weights"),
        ("int8", dict(s13="shape"), r"w13_scale must be fp32 \[8, 80\] for int8 weights, got Float \[8, 79\]"),
        ("int8", dict(q2="fp8"), r"w13 and w2 must have hidden_states' dtype .* got Char and Float8_e4m3fn"),
        ("int8", dict(q13="bf16", q2="bf16"), r"w13_scale, w2_scale and block_shape are for float8_e4m3fn or int8"),
    ],
)  # fmt: skip
def test_bad_quantization_arguments(fmt, change, message):
    args = _bad(fmt)
    edits = {
        "half": lambda t: t.half(),
        "shape": lambda t: t[..., :-1],
        "fp8": lambda t: t.float().to(FP8),
        "bf16": lambda t: t.to(torch.bfloat16),
    }
    for name, value in change.items():
        args[name] = edits[value](args[name]) if isinstance(value, str) else value
    with pytest.raises(RuntimeError, match=message):
        torch.ops.qwen_fast.fused_experts(
            args["x"], args["q13"], args["q2"], args["weights"], args["ids"], None, "silu", args["s13"], args["s2"],
            args["block_shape"],
        )  # fmt: skip
