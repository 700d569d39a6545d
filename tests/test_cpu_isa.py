"""Run-time instruction-set choice of the CPU kernels (csrc/cpu/isa.h): the level picked is the best this CPU has,
QWEN_FAST_CPU_ISA lowers it, and fused_experts agrees with the reference on every level this machine can run
(baseline, avx2 = x86-64-v3, avx512 = x86-64-v4, avx512_bf16), for every weight format: so CI on an AVX-512 machine
also checks the code that AVX2-only and older CPUs run.
"""

import platform
from pathlib import Path

import pytest
import torch
from numerics import assert_close
from test_moe_cpu_quant import dequantize, quantize

import qwen_fast
from qwen_fast.reference.moe import experts

pytestmark = pytest.mark.skipif(qwen_fast._native.LOAD_ERROR is not None, reason="the C++ extension is not built")

LEVELS = ["baseline", "avx2", "avx512", "avx512_bf16"]


def _expected_level() -> str:
    """The best level from /proc/cpuinfo's flags, as isa.cpp defines the levels."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    avx2 = {"avx2", "fma", "f16c", "bmi1", "bmi2"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags
    if avx512 and "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx512" if avx512 else "avx2" if avx2 else "baseline"


def _runnable() -> list[str]:
    return LEVELS[: LEVELS.index(qwen_fast._C.cpu_isa()) + 1]


@pytest.fixture(autouse=True)
def _unforced(monkeypatch):
    monkeypatch.delenv("QWEN_FAST_CPU_ISA", raising=False)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads /proc/cpuinfo of an x86-64 Linux"
)
def test_picks_the_best_level_the_cpu_has():
    assert qwen_fast._C.cpu_isa() == _expected_level()


def test_environment_lowers_the_level(monkeypatch):
    for level in _runnable():
        monkeypatch.setenv("QWEN_FAST_CPU_ISA", level)
        assert qwen_fast._C.cpu_isa() == level
    monkeypatch.setenv("QWEN_FAST_CPU_ISA", "")
    assert qwen_fast._C.cpu_isa() == _runnable()[-1]


def test_bad_or_unsupported_level_is_refused(monkeypatch):
    runnable = _runnable()
    monkeypatch.setenv("QWEN_FAST_CPU_ISA", "amx")
    with pytest.raises(
        ValueError, match=r"QWEN_FAST_CPU_ISA must be one of baseline, avx2, avx512, avx512_bf16.*'amx'"
    ):
        qwen_fast._C.cpu_isa()
    for level in LEVELS[len(runnable) :]:  # levels above this CPU's, if any
        monkeypatch.setenv("QWEN_FAST_CPU_ISA", level)
        with pytest.raises(ValueError, match=f"QWEN_FAST_CPU_ISA={level} but this CPU"):
            qwen_fast._C.cpu_isa()
        x = torch.randn(2, 8)
        with pytest.raises(RuntimeError, match=f"QWEN_FAST_CPU_ISA={level}"):
            torch.ops.qwen_fast.fused_experts(x, torch.randn(2, 8, 8), torch.randn(2, 8, 4), torch.ones(2, 1),
                                              torch.zeros(2, 1, dtype=torch.int32))  # fmt: skip


FORMATS = {  # name: (activation dtype, weight format, block_shape)
    "fp32": (torch.float32, None, None),
    "fp16": (torch.float16, None, None),
    "bf16": (torch.bfloat16, None, None),
    "fp8-128-bf16": (torch.bfloat16, "fp8", [128, 128]),
    "fp8-16x32-fp32": (torch.float32, "fp8", [16, 32]),
    "fp8-5x3-fp16": (torch.float16, "fp8", [5, 3]),
    "int8-bf16": (torch.bfloat16, "int8", None),
    "int8-fp32": (torch.float32, "int8", None),
}


def _case(fmt: str, num_tokens: int, inter: int):
    """fused_experts arguments and the reference's output. H = 72 and I = 40 or 48: partial 16- and 32-lane vectors
    along both reductions, partial tiles of 16 weight rows; I = 48 puts the up rows of fp8 [16, 32] on block
    edges (AVX-512 tiles), I = 40 off them (generic tiles)."""
    dtype, quant, block_shape = FORMATS[fmt]
    hidden, num_experts = 72, 8
    x = torch.randn(num_tokens, hidden).to(dtype)
    w13 = torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter) / inter**0.5
    ids = torch.rand(num_tokens, num_experts).argsort(-1)[:, :2].int()
    weights = torch.rand(ids.shape)
    if quant is None:
        w13, w2 = w13.to(dtype), w2.to(dtype)
        return (x, w13, w2, weights, ids, None, "silu", None, None, None), experts(x, w13, w2, weights, ids)
    (q13, s13), (q2, s2) = quantize(w13, quant, block_shape), quantize(w2, quant, block_shape)
    deq13, deq2 = dequantize(q13, s13, block_shape, dtype), dequantize(q2, s2, block_shape, dtype)
    expected = experts(x, deq13, deq2, weights, ids)
    return (x, q13, q2, weights, ids, None, "silu", s13, s2, block_shape), expected


@pytest.mark.parametrize("inter", [40, 48])
@pytest.mark.parametrize("num_tokens", [1, 7])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_level_matches_the_reference(monkeypatch, fmt, num_tokens, inter):
    args, expected = _case(fmt, num_tokens, inter)
    outs = {}
    for level in _runnable():
        monkeypatch.setenv("QWEN_FAST_CPU_ISA", level)
        outs[level] = torch.ops.qwen_fast.fused_experts(*args)
        assert_close(outs[level], expected)
    if fmt == "fp32" and "avx512" in outs:  # different code ran: the summation orders differ in the last bits
        assert not torch.equal(outs["avx2"], outs["avx512"])


def test_every_level_through_the_public_api(monkeypatch):
    """qwen_fast.fused_experts on the cpu backend (recorded) at each level, bf16 decode."""
    args, expected = _case("bf16", 1, 48)
    for level in _runnable():
        monkeypatch.setenv("QWEN_FAST_CPU_ISA", level)
        with qwen_fast.use_backend("cpu"), qwen_fast.record_backends() as calls:
            out = qwen_fast.fused_experts(*args[:5])
        assert ("fused_experts", "cpu") in calls
        assert_close(out, expected)
