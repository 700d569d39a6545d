"""Runs one case of the op sample table (qwen_fast/cli/samples) against `qwen_fast.reference`: for
`qwen-fast check` (each op's first sample in fp32, or with --all every sample and dtype) and for the test suite's op
harness (tests/test_ops.py), which share this code and the table.

A case is (op, backend, device, sample, dtype). The sample builds the op's keyword arguments, seeded, once on the
device under test and once on CPU; the backend runs on the first inside `use_backend(backend)` and
`record_backends()`, the reference on the second. Compared: the op's outputs and every tensor argument after the
call (so the ops that write a cache in place are checked on the cache, and the others on not writing their
inputs): integer tensors and the op's exact tensors bit for bit, floating-point ones with TOLERANCE for their dtype,
and attention outputs with flash-attn's error budget against the reference run on fp32 copies of the arguments.
The record proves which backend ran.
"""

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import qwen_fast
from qwen_fast import reference
from qwen_fast.ops import OPS

from .samples import SPECS, Inputs, Sample

# The one tolerance table (tests/numerics.py uses it too): (atol, rtol) per dtype of the compared tensor. fp32 allows
# for a different summation order over a few thousand terms; fp16/bf16 a couple of units in the last place.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# flash-attn's error budget: max|out - ref_fp32| <= 2 * max|ref_lowprec - ref_fp32| + BUDGET_EPS.
BUDGET_EPS = 1e-5

# Every op for check's default run, by name: its first sample.
CASES = {op: spec.samples[0] for op, spec in SPECS.items()}


@dataclass
class Result:
    """One case: PASS or FAIL, the largest |backend - reference| over the compared tensors, the wall time of the
    one checked call (with a first call's compilation), the backends the record shows."""

    op: str
    backend: str
    device: str
    sample: str = ""
    dtype: str = "float32"
    status: str = "FAIL"
    max_abs_error: float | None = None
    seconds: float | None = None
    ran: list[str] = field(default_factory=list)
    error: str = ""

    def line(self) -> str:
        error = "-" if self.max_abs_error is None else f"{self.max_abs_error:.2e}"
        seconds = "-" if self.seconds is None else f"{self.seconds * 1e3:.1f} ms"
        text = (
            f"{self.status:4}  {self.op:24} {self.backend:6} {self.device:5} {self.dtype:8} {self.sample:24} "
            f"max abs err {error:>8}  {seconds:>10}"
        )
        if self.backend == "torch":
            text += "  (the reference against itself: checks the sample and the dispatch only)"
        return f"{text}  {self.error}" if self.error else text

    def as_dict(self) -> dict:
        return asdict(self)


def tensors(result, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for the op's outputs, then for every tensor argument (after the call: caches are written)."""
    outputs = result if isinstance(result, tuple) else (result,)
    named = [(f"output[{i}]", t) for i, t in enumerate(outputs) if isinstance(t, torch.Tensor)]
    return named + [(name, t) for name, t in kwargs.items() if isinstance(t, torch.Tensor)]


def _over_budget(actual: torch.Tensor, wanted: torch.Tensor, fp32: torch.Tensor) -> str:
    """Why `actual` breaks flash-attn's budget, or "". Rows the reference gives as exactly 0 (no key to attend
    to) must be exactly 0."""
    error = (actual.double() - fp32.double()).abs().max().item()
    base = (wanted.double() - fp32.double()).abs().max().item()
    if not error <= 2 * base + BUDGET_EPS:
        return f"max abs error {error:.3e} exceeds the budget 2 * {base:.3e} + {BUDGET_EPS:.0e}"
    blind = (wanted == 0).all(dim=-1)
    if (actual[blind] != 0).any():
        return f"{int((actual[blind] != 0).any(-1).sum())} rows with no key to attend to are not exactly 0"
    return ""


def compare(got, expected, fp32=None, exact: tuple[str, ...] = ()) -> tuple[float, str]:
    """(max abs error over all tensors, "" or the first mismatch). Integer tensors and those named in `exact`
    bit for bit; outputs with the budget when the fp32 reference `fp32` is given; the rest within TOLERANCE."""
    worst, problem = 0.0, ""
    for index, ((name, actual), (_, wanted)) in enumerate(zip(got, expected, strict=True)):
        actual = actual.cpu()
        if actual.shape != wanted.shape or actual.dtype != wanted.dtype:
            got_type, wanted_type = f"{actual.dtype} {tuple(actual.shape)}", f"{wanted.dtype} {tuple(wanted.shape)}"
            return worst, f"{name}: got {got_type}, reference {wanted_type}"
        if not actual.numel():
            continue
        if torch.equal(actual, wanted):  # also the fast path for large inputs the op only reads
            continue
        diff = (actual.double() - wanted.double()).abs()
        worst = max(worst, diff.nan_to_num(float("inf")).max().item())
        if problem:
            continue
        if fp32 is not None and name.startswith("output"):
            budget = _over_budget(actual, wanted, fp32[index][1])
            problem = f"{name}: {budget}" if budget else ""
            continue
        if name in exact or not actual.is_floating_point():
            bad = ~(diff == 0)
        else:
            atol, rtol = TOLERANCE[actual.dtype]
            bad = ~(diff <= atol + rtol * wanted.double().abs())
        if bad.any():
            where = tuple(bad.nonzero()[0].tolist())
            problem = f"{name}{list(where)}: {actual[where].item():.6g} != reference {wanted[where].item():.6g}"
    return worst, problem


def _fp32(kwargs: dict) -> dict:
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}


@functools.lru_cache(maxsize=2)
def _expect(function: Callable, case: Sample, dtype: torch.dtype, budget: bool) -> tuple[list, list | None]:
    """The reference `function` on `case`'s arguments on CPU: its tensors (outputs, then arguments after the call)
    and, for `budget`, the same on fp32 copies of the arguments. Cached for the next backends of the same case."""
    cpu = torch.device("cpu")
    kwargs = case.build(Inputs(cpu, dtype))
    expected = tensors(function(**kwargs), kwargs)
    if not budget or dtype == torch.float32:
        return expected, expected if budget else None
    kwargs = _fp32(case.build(Inputs(cpu, dtype)))
    return expected, tensors(function(**kwargs), kwargs)


def call_op(op: str, kwargs: dict):
    return getattr(qwen_fast, op)(**kwargs)


def run_case(
    op: str,
    backend: str,
    device: torch.device,
    sample: str | None = None,
    dtype: torch.dtype | None = None,
    call: Callable[[str, dict], object] = call_op,
) -> Result:
    """Run `op` on `backend` with `sample`'s arguments (default: the op's first) in `dtype` (default: the op's
    first) on `device`, and check it against the reference. `call(op, kwargs)` makes the call (the tests pass one
    that compiles it)."""
    spec = SPECS[op]
    case, dtype = spec.sample(sample), dtype or spec.dtypes[0]
    result = Result(op, backend, device.type, case.name, str(dtype).removeprefix("torch."))
    try:
        expected, fp32 = _expect(getattr(reference, op), case, dtype, spec.budget)
        kwargs = case.build(Inputs(device, dtype))
        with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
            start = time.perf_counter()
            output = call(op, kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result.seconds = time.perf_counter() - start
    except Exception as error:  # a crash (of the op on this backend, or of the reference) fails this case only
        result.error = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        return result
    result.ran = sorted({b for name, b in calls if name == op})
    got = tensors(output, kwargs)
    exact = spec.exact + (spec.exact_on_cpu if device.type == "cpu" else ())
    result.max_abs_error, mismatch = compare(got, expected, fp32, exact)
    elsewhere = [name for name, t in got if t.device.type != device.type]
    if result.ran != [backend]:
        result.error = f"the record shows {op} ran on {result.ran or 'nothing'}, not {backend}"
    elif elsewhere:
        result.error = f"{', '.join(elsewhere)} not on {device.type}"
    else:
        result.error = mismatch
    result.status = "FAIL" if result.error else "PASS"
    return result


def plan(ops: list[str], backends: list[str] | None, quick: bool, every_sample: bool = False) -> list[tuple]:
    """(op, backend, device, sample, dtype) for every kernel backend usable here (or `auto`'s choice alone when
    quick), on CPU tensors and, with a GPU, on CUDA tensors: each op's first sample in fp32 (and bf16 on triton with
    CUDA tensors; the interpreter cannot do bf16 for most ops), or with `every_sample` every sample in every dtype the
    table gives it on that backend. The torch backend is the reference itself: only when `backends` names it."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    cases = []
    for device in devices:
        for op in ops:
            usable = [b for b in OPS[op].impls if OPS[op].problem(b, device) is None]
            if quick:
                usable = [OPS[op].select(device)]
            # torch is the reference; flash_attn another library (checked when named: bf16, its shapes permitting)
            wanted = backends or (usable if quick else [b for b in usable if b not in ("torch", "flash_attn")])
            for backend in (b for b in usable if b in wanted):
                if not every_sample:
                    dtypes = (torch.bfloat16,) if backend == "flash_attn" else SPECS[op].dtypes[:1]
                    if backend == "triton" and device.type == "cuda" and torch.bfloat16 in SPECS[op].dtypes:
                        dtypes += (torch.bfloat16,)
                    cases += [(op, backend, device, None, dtype) for dtype in dict.fromkeys(dtypes)]
                    continue
                for sample in SPECS[op].samples:
                    for dtype in SPECS[op].dtypes_for(sample, backend, device.type):
                        cases.append((op, backend, device, sample.name, dtype))
    return cases
