"""What the static GPU check compiles: the launches the launchers make, specialised as Triton's JIT specialises them.

Each kernel module defines `compile_specs() -> list[CompileSpec]` by calling its own launcher on "meta" tensors at
representative (model) shapes inside `recorded_launches()`, which records every kernel launch (the kernel, the
arguments exactly as passed, the launch options) instead of running it. No signature is written by hand, so the
configs, argument types and strides checked are those launched.

`specialize(spec, arch)` then runs Triton's own launch-time binder for that target (the code JITFunction.run runs:
`create_function_from_signature` over the kernel's parameters, then `JITFunction._pack_args`), so the compiled
signature is the launch's: an int equal to 1 becomes the constant 1, ints and pointers divisible by 16 get
`tt.divisibility = 16`, ints fit for 32 bits are i32, None is a constant. A meta tensor's data_ptr() is 0 plus its
storage offset in bytes, so fresh tensors count as 16-byte aligned (CUDA's caching allocator hands out 512-byte
aligned blocks) and views as their offset makes them, as on a GPU. tests/test_compile_spec.py checks, kernel by
kernel, that a real launch (under TRITON_INTERPRET=1) gets the specialisation this module derives.
"""

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

DEFAULT_ARCHS = (80, 90)  # the config families: sm_80 (A100) and sm_90 (H100/H200)
ARCH_SMS = {80: 108, 90: 132}  # SMs of the families' reference parts: A100, H100/H200 SXM
META = torch.device("meta")
_RECORDING_ARCH = contextvars.ContextVar("recording_arch", default=None)


def device_arch(device: torch.device) -> int:
    """The config family (80 or 90) of launches on `device`: a CUDA device's own (sm_90 and newer: 90, older: 80);
    while launches are recorded for an arch (`launches`), that arch; else (CPU tensors, the interpreter) 90."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 90 if 10 * major + minor >= 90 else 80
    recording = _RECORDING_ARCH.get()
    return 90 if recording is None else recording


def num_sms(device: torch.device) -> int:
    """The SMs a launch on `device` spreads over: a CUDA device's count, else its family's ARCH_SMS."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return ARCH_SMS[device_arch(device)]


@dataclass(frozen=True)
class CompileSpec:
    """One recorded launch: the @triton.jit kernel, its positional and keyword arguments as the launcher passed them
    (keywords include constexprs and num_warps/num_stages), and the archs whose configs it stands for."""

    kernel: object
    args: tuple
    kwargs: dict
    label: str = field(default="")
    archs: tuple[int, ...] = DEFAULT_ARCHS

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def num_warps(self) -> int:
        return self.kwargs.get("num_warps", 4)

    @property
    def num_stages(self) -> int:
        return self.kwargs.get("num_stages", 3)


@contextlib.contextmanager
def recorded_launches():
    """Within the block, launching any Triton kernel (compiled or interpreted) records a CompileSpec in the list
    yielded and runs nothing; tensors the launcher allocates are never written."""
    found = []

    def record(kernel, *args, grid, warmup, **kwargs):
        found.append(CompileSpec(kernel, args, dict(kwargs)))

    saved = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
    for cls in saved:
        cls.run = record
    try:
        yield found
    finally:
        for cls, run in saved.items():
            cls.run = run


def launches(launch, label: str = "", archs: tuple[int, ...] = DEFAULT_ARCHS) -> list[CompileSpec]:
    """The launches `launch()` makes (see recorded_launches) once per arch in `archs`, with device_arch() of meta
    tensors returning that arch meanwhile (so launchers that pick configs per arch record each family's), each
    labelled and tagged with its arch."""
    specs = []
    for arch in archs:
        token = _RECORDING_ARCH.set(arch)
        try:
            with recorded_launches() as found:
                launch()
        finally:
            _RECORDING_ARCH.reset(token)
        specs += [CompileSpec(s.kernel, s.args, s.kwargs, label, (arch,)) for s in found]
    return specs


def as_jit(kernel) -> JITFunction:
    """The JITFunction of a kernel (under TRITON_INTERPRET=1 @triton.jit makes an InterpretedFunction: rebuilt from
    its Python function with the same specialisation options)."""
    if isinstance(kernel, JITFunction):
        return kernel
    return _jit_of(kernel.fn, tuple(sorted((k, _frozen(v)) for k, v in kernel.kwargs.items() if "specialize" in k)))


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


@functools.cache
def _jit_of(fn, options: tuple) -> JITFunction:
    return JITFunction(fn, **{name: list(value) if isinstance(value, tuple) else value for name, value in options})


@functools.cache
def _backend(arch: int):
    return make_backend(GPUTarget("cuda", arch, 32))


def _launch_options(kwargs: dict) -> dict:
    """The options JITFunction.run adds before binding (the knobs that exist in this Triton)."""
    added = {"debug": kwargs.get("debug", False) or knobs.runtime.debug}
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            added[knob] = getattr(knobs.compilation, knob)
    return kwargs | added


def specialize(spec: CompileSpec, arch: int) -> tuple[ASTSource, dict]:
    """(the ASTSource the JIT would compile for this launch on sm_<arch>, its compile options as a dict)."""
    kernel, backend = as_jit(spec.kernel), _backend(arch)
    kwargs = _launch_options(spec.kwargs)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*spec.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def specialization_key(spec: CompileSpec, arch: int) -> tuple:
    """Everything that selects the compiled binary of a launch: kernel, signature, constants, attributes, options."""
    source, options = specialize(spec, arch)
    constants = tuple(sorted((path, repr(value)) for path, value in source.constants.items()))
    attrs = tuple(sorted((path, repr(value)) for path, value in source.attrs.items()))
    return (spec.name, tuple(source.signature.items()), constants, attrs, repr(sorted(options.items())))


def unique(specs: list[CompileSpec], arch: int) -> list[CompileSpec]:
    """The specs for sm_<arch> whose specialisations differ, first label kept."""
    kept = {}
    for spec in specs:
        if arch in spec.archs:
            kept.setdefault(specialization_key(spec, arch), spec)
    return list(kept.values())
