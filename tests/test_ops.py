"""The op harness: every public op, on every backend, in every dtype, on every sample of the table
(qwen_fast/cli/samples: awkward shapes, non-contiguous and stride-0 arguments) against qwen_fast.reference, through
the runner that `qwen-fast check` uses (qwen_fast/cli/selftest.py: outputs and mutated arguments compared with the
one tolerance table or flash-attn's budget, the backend proven by record_backends). Then torch.library.opcheck of
every registered op the public functions call, and torch.compile(fullgraph=True) of every op.

Backends: cpu and torch on CPU tensors; triton on CPU tensors only under TRITON_INTERPRET=1 (`interpret`, fp32 and
fp16: the interpreter cannot do bf16 tl.dot); cuda, triton and torch on CUDA tensors (`gpu`, run unchanged where
CUDA exists).
"""

import functools
import os

import pytest
import torch
from backends import BACKENDS
from torch.utils._python_dispatch import TorchDispatchMode

import qwen_fast
from qwen_fast.cli import selftest
from qwen_fast.cli.samples import SPECS, Inputs
from qwen_fast.ops import OPS


def _cases():
    """(op, backend, device, sample, dtype), the backends innermost: consecutive cases share the reference's result."""
    for op, spec in SPECS.items():
        for sample in spec.samples:
            for dtype in dict.fromkeys(spec.dtypes + spec.interpret_dtypes):
                for device, backend, marks in BACKENDS:
                    if backend in OPS[op].impls and dtype in spec.dtypes_for(sample, backend, device):
                        name = str(dtype).removeprefix("torch.")
                        yield pytest.param(op, backend, device, sample.name, dtype, marks=marks,
                                           id=f"{op}-{sample.name}-{name}-{backend}-{device}")  # fmt: skip


@pytest.mark.parametrize("op,backend,device,sample,dtype", list(_cases()))
def test_op_matches_reference(op, backend, device, sample, dtype):
    result = selftest.run_case(op, backend, torch.device(device), sample, dtype)
    assert result.status == "PASS", result.line()


def test_the_table_covers_every_op_and_backend():
    """Every public op has samples, and every backend it has runs some of them on some device; except the optional
    flash_attn backend (flash-attn's own package, CUDA only, not installable here: tests/test_flash_attn_backend.py
    tests its selection and argument mapping with a stand-in module)."""
    assert set(SPECS) == set(OPS)
    ran = {(op, backend) for op, backend, *_ in (p.values for p in _cases())}
    assert ran == {(op, backend) for op in OPS for backend in OPS[op].impls if backend != "flash_attn"}


# --- torch.library.opcheck of the registered ops the public functions call -------------------------------------------


class _RegisteredOps(TorchDispatchMode):
    """Records the calls of qwen_fast's registered ops (namespaces qwen_fast*), with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace.startswith("qwen_fast"):
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@functools.cache
def _registered_calls(op: str, backend: str, sample: str, dtype: torch.dtype) -> tuple:
    """(OpOverload, args, kwargs) of the registered ops that qwen_fast.<op> calls on `backend` for `sample`."""
    kwargs = SPECS[op].sample(sample).build(Inputs(torch.device("cpu"), dtype))
    with qwen_fast.use_backend(backend), _RegisteredOps() as mode:
        getattr(qwen_fast, op)(**kwargs)
    return tuple(mode.calls)


def _opchecks():
    """Per op and kernel backend: the first sample in the first dtype, and the op's opcheck samples (arguments that
    take other paths: no tokens, grouped routing, no new keys, ...) in the last dtype."""
    for op, spec in SPECS.items():
        for backend, marks in (("cpu", ()), ("triton", (pytest.mark.interpret,))):
            if backend not in OPS[op].impls:
                continue
            for index, sample in enumerate((spec.samples[0], *map(spec.sample, spec.opcheck))):
                dtype = spec.dtypes_for(sample, backend, "cpu")[-1 if index else 0]
                name = f"{op}-{backend}-{str(dtype).removeprefix('torch.')}-{sample.name}"
                yield pytest.param(op, backend, sample.name, dtype, marks=marks, id=name)


@pytest.mark.parametrize("op,backend,sample,dtype", list(_opchecks()))
def test_opcheck(op, backend, sample, dtype):
    calls = _registered_calls(op, backend, sample, dtype)
    assert calls, f"qwen_fast.{op} on {backend} called no registered op"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs)


def test_every_registered_op_is_opchecked():
    """The public functions reach every op registered in the qwen_fast namespaces (qwen_fast_triton under the
    interpreter), so the opchecks above cover them all."""
    backends = ("cpu", "triton") if os.environ.get("TRITON_INTERPRET") == "1" else ("cpu",)
    namespaces = ("qwen_fast::", "qwen_fast_triton::")[: len(backends)]
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith(namespaces)}
    reached = set()
    for op in SPECS:
        for backend in (b for b in backends if b in OPS[op].impls):
            calls = _registered_calls(op, backend, SPECS[op].samples[0].name, SPECS[op].dtypes[0])
            reached |= {f"{func.namespace}::{func._opname}" for func, _, _ in calls}
    assert registered <= reached, f"registered ops no public function reaches: {sorted(registered - reached)}"


# --- torch.compile(fullgraph=True) per op -------------------------------------------------------------------------


def _compiled(compiler: str):
    """A `call` for selftest.run_case: the op traced with fullgraph=True (tensors as graph inputs, the rest
    constants) and compiled by `compiler`."""

    def call(op: str, kwargs: dict):
        names = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]
        constants = {name: value for name, value in kwargs.items() if name not in names}

        def run(*tensors):
            return getattr(qwen_fast, op)(**dict(zip(names, tensors, strict=True)), **constants)

        torch._dynamo.reset()
        return torch.compile(run, fullgraph=True, backend=compiler)(*(kwargs[name] for name in names))

    return call


# (backend, compiler, marks): inductor over the extension's kernels; aot_eager (fakes, functionalization) over Triton
# under the interpreter and over the references that compile.
COMPILERS = [("cpu", "inductor", ()), ("torch", "aot_eager", ()), ("triton", "aot_eager", (pytest.mark.interpret,))]
COMPILES = [pytest.param(op, backend, compiler, marks=marks, id=f"{op}-{backend}")
            for op in SPECS for backend, compiler, marks in COMPILERS
            if backend in OPS[op].impls and (backend != "torch" or SPECS[op].compiles_reference)]  # fmt: skip


@pytest.mark.parametrize("op,backend,compiler", COMPILES)
def test_compiles_fullgraph(op, backend, compiler):
    result = selftest.run_case(op, backend, torch.device("cpu"), call=_compiled(compiler))
    assert result.status == "PASS", result.line()
