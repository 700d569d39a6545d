"""gpu_check compiles what launches (kernels/compile_spec.py): for every op with a Triton backend, a real launch under
the interpreter is specialised by Triton's own JIT (JITFunction.run, with a stand-in driver naming sm_90 and the
compile step intercepted), and that specialisation must equal the one gpu_check derives from the same launch recorded
on meta tensors; for the MoE kernels it must also be among those gpu_check compiles from the model shapes."""

import contextlib
import functools
import importlib
import inspect
import pkgutil
from unittest import mock

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import qwen_fast
import qwen_fast.kernels as package
from qwen_fast.cli import selftest
from qwen_fast.cli.samples import SPECS
from qwen_fast.kernels import compile_spec
from qwen_fast.kernels.compile_spec import CompileSpec, as_jit, specialize, unique
from qwen_fast.ops import OPS

ARCH = 90
TRITON_OPS = sorted(op for op in OPS if "triton" in OPS[op].impls)


class _Sm90:
    """The driver JITFunction.run asks for a device, a stream and the target: an sm_90 GPU that is not there."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)


def _comparable(signature: dict, constants: dict, attrs: dict, options: dict) -> tuple:
    return (
        tuple(signature.items()),
        tuple(sorted((path, repr(value)) for path, value in constants.items())),
        tuple(sorted((path, repr(value)) for path, value in attrs.items())),
        repr(sorted(options.items())),
    )


def jit_specialization(kernel, args: tuple, kwargs: dict) -> tuple:
    """What Triton's JIT itself would compile for this launch on sm_90: JITFunction.run up to its compile step."""
    seen = []

    def compile_step(self, key, signature, device, constexprs, options, attrs, warmup):
        seen.append(_comparable(signature, constexprs, attrs, options.__dict__))

    jit = as_jit(kernel)
    with mock.patch.object(driver, "_active", _Sm90()), mock.patch.object(JITFunction, "_do_compile", compile_step):
        assert jit.run(*args, grid=(1,), warmup=False, **dict(kwargs)) is None
    return seen[0]


def checked_specialization(spec: CompileSpec) -> tuple:
    source, options = specialize(spec, ARCH)
    return _comparable(source.signature, source.constants, source.attrs, options)


def _on_meta(value):
    """A meta tensor with `value`'s dtype, shape, strides and storage offset (so the same byte alignment: CPU
    storage is 64-byte aligned, meta storage starts at 0); other values as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    span = value.storage_offset() + sum((s - 1) * st for s, st in zip(value.shape, value.stride(), strict=True)) + 1
    memory = torch.empty(max(span, 1), dtype=value.dtype, device="meta")
    return memory.as_strided(value.shape, value.stride(), value.storage_offset())


@contextlib.contextmanager
def launches_with_jit_view():
    """Runs interpreted launches as usual, first noting (kernel, JIT specialisation, recorded-on-meta spec)."""
    found, run = [], InterpretedFunction.run

    def noting(kernel, *args, grid, warmup, **kwargs):
        meta = CompileSpec(kernel, tuple(map(_on_meta, args)), {k: _on_meta(v) for k, v in kwargs.items()})
        found.append((kernel, jit_specialization(kernel, args, kwargs), meta))
        return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

    with mock.patch.object(InterpretedFunction, "run", noting):
        yield found


@functools.cache
def _module_specs(module: str) -> set:
    specs = importlib.import_module(f"qwen_fast.kernels.{module}").compile_specs()
    return {checked_specialization(spec) for spec in unique(specs, ARCH)}


@pytest.mark.interpret
@pytest.mark.parametrize("op", TRITON_OPS)
def test_checked_kernels_are_the_launched_ones(op):
    with launches_with_jit_view() as found:
        result = selftest.run_case(op, "triton", torch.device("cpu"), dtype=SPECS[op].interpret_dtypes[-1])
    assert result.status == "PASS", result.line()  # the record shows the op ran on triton, and matched
    assert found, f"{op} launched no Triton kernel"
    for kernel, launched, meta in found:
        assert checked_specialization(meta) == launched, kernel.__name__


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_moe_kernels_launched_are_among_those_checked(dtype):
    """fused_moe (routing, alignment, both GEMMs, combine) at a shape whose ints fall in the classes of the model
    shapes' (H, I, strides multiples of 16; k = 8, neither 1 nor a multiple of 16; E = 64, a family's): each kernel a
    real launch compiles is one gpu_check compiles (the same specialisation, config and options)."""
    torch.manual_seed(0)
    x = torch.randn(3, 64, dtype=dtype)
    w13, w2 = torch.randn(64, 64, 64, dtype=dtype) / 8, torch.randn(64, 64, 32, dtype=dtype) / 8
    with launches_with_jit_view() as found, qwen_fast.use_backend("triton"), qwen_fast.record_backends() as calls:
        qwen_fast.fused_moe(x, w13, w2, torch.randn(3, 64), 8)
    assert {backend for _, backend in calls} == {"triton"}
    names = {kernel.__name__ for kernel, _, _ in found}
    assert {"_fused_topk_kernel", "_count_kernel", "_gate_up_kernel", "_down_kernel", "_combine_kernel"} <= names
    for kernel, launched, _ in found:
        module = kernel.fn.__module__.rsplit(".", 1)[-1]
        assert launched in _module_specs(module), f"{module}.{kernel.__name__} is not among gpu_check's kernels"


def test_every_kernel_with_a_launcher_is_checked():
    """Each kernels/ module's compile_specs() records a launch of each of its Triton kernels that is launched."""
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"qwen_fast.kernels.{info.name}")
        source = inspect.getsource(module)
        kernels = {
            name
            for name, value in vars(module).items()
            if isinstance(value, JITFunction | InterpretedFunction) and f"{name}[" in source
        }
        recorded = {spec.name for spec in getattr(module, "compile_specs", list)()}
        assert kernels <= recorded, f"{info.name}: {sorted(kernels - recorded)} launched but not checked"


def test_specialization_follows_the_jit_rule():
    """Ints equal to 1 are constants, ints and pointers divisible by 16 are aligned, others are neither."""
    from qwen_fast.kernels import moe_gemm

    spec = next(s for s in moe_gemm.compile_specs() if s.name == "_combine_kernel")
    source, _ = specialize(spec, ARCH)
    names = list(source.signature)
    assert source.signature["stride_wk"] == "constexpr"  # topk_weights [T, k] contiguous: stride 1
    assert source.constants[(names.index("stride_wk"),)] == 1
    assert source.attrs[(names.index("hidden_size"),)] == [["tt.divisibility", 16]]  # H = 2048
    assert source.attrs[(names.index("y"),)] == [["tt.divisibility", 16]]  # a fresh tensor
    assert source.attrs[(names.index("topk"),)] == []  # k = 8
    assert compile_spec.device_arch(torch.device("meta")) == 90
