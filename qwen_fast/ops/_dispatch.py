"""Per-call backend choice: cuda (C++ extension), triton, cpu (C++ extension), torch (the reference).

`auto` takes the first usable backend in the op's order for the tensors' device. `QWEN_FAST_BACKEND=<name>` or
`with qwen_fast.use_backend(name):` force one; forcing a backend the op lacks, or one that cannot run on the
tensors' device here, raises an error that names the op and the backends that would work. Nothing falls back
silently. `record_backends()` lists which backend ran each op call (the tests use it to prove what ran).
"""

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from qwen_fast import _native

BACKENDS = ("cuda", "triton", "cpu", "torch")
_forced: str | None = None
_trace: list[tuple[str, str]] | None = None


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS + ('auto',))}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force `name` ("cuda", "triton", "cpu", "torch" or "auto") for every qwen_fast op called inside the block.

    >>> with qwen_fast.use_backend("torch"):
    ...     weights, ids = qwen_fast.fused_topk(torch.randn(4, 8), topk=2)
    """
    global _forced
    previous, _forced = _forced, _check_name(name, "use_backend(name)")
    try:
        yield
    finally:
        _forced = previous


def forced_backend() -> str | None:
    """The backend forced by use_backend() or QWEN_FAST_BACKEND, or None for auto."""
    name = _forced or _check_name(os.environ.get("QWEN_FAST_BACKEND", "auto"), "QWEN_FAST_BACKEND")
    return None if name == "auto" else name


@contextlib.contextmanager
def record_backends() -> Iterator[list[tuple[str, str]]]:
    """Collects (op, backend) for every qwen_fast op call inside the block."""
    global _trace
    previous, _trace = _trace, []
    try:
        yield _trace
    finally:
        _trace = previous


# The availability probes below ask the extension's registry and the environment. Under torch.compile they are
# evaluated once while tracing (assume_constant_result), so a compiled graph holds the backend chosen then.
@torch.compiler.assume_constant_result
def _triton_problem(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "triton runs CPU tensors only under TRITON_INTERPRET=1"
    return f"triton does not run on {device.type} tensors"


@torch.compiler.assume_constant_result
def _native_problem(op: str, backend: str, device: torch.device) -> str | None:
    key = backend.upper()
    if device.type != backend:
        return f"the {backend} backend runs {backend} tensors, got {device.type} tensors"
    if not _native.has_kernel(op, key):
        if _native.LOAD_ERROR is not None:
            return f"the C++ extension is not built ({_native.LOAD_ERROR})"
        return f"the C++ extension was built without its {key} kernels"
    return None


@dataclass(frozen=True)
class Op:
    """One public op: its implementations per backend and the order `auto` tries them in, per device type.
    `native_op` names the extension op whose kernels the cpu/cuda backends run (default: the op's own name; a
    composite such as fused_moe runs fused_experts'). `kernel_limit(*args, **kwargs)` says why the kernel backends
    (all but torch) cannot take a call's arguments, or None: `auto` then skips them, and forcing one is an error."""

    name: str
    impls: dict[str, Callable]
    auto_order: dict[str, tuple[str, ...]]
    native_op: str = ""
    kernel_limit: Callable[..., str | None] | None = None

    def problem(self, backend: str, device: torch.device) -> str | None:
        """None when `backend` can run this op on `device` here, else why not."""
        if backend not in self.impls:
            return f"{self.name} has no {backend} backend (it has: {', '.join(self.impls)})"
        if backend == "torch":
            return None
        if backend == "triton":
            return _triton_problem(device)
        return _native_problem(self.native_op or self.name, backend, device)

    def _call_problem(self, backend: str, device: torch.device, args: tuple, kwargs: dict) -> str | None:
        problem = self.problem(backend, device)
        if problem is None and backend != "torch" and self.kernel_limit is not None and (args or kwargs):
            problem = self.kernel_limit(*args, **kwargs)
        return problem

    def select(self, device: torch.device, args: tuple = (), kwargs: dict | None = None) -> str:
        """The backend a call with `args`/`kwargs` on `device` runs on (without arguments: kernel_limit unchecked)."""
        kwargs = kwargs or {}
        forced = forced_backend()
        if forced is not None:
            problem = self._call_problem(forced, device, args, kwargs)
            if problem is not None:
                usable = [b for b in self.impls if self._call_problem(b, device, args, kwargs) is None]
                raise RuntimeError(
                    f"qwen_fast.{self.name}: backend {forced!r} is forced but cannot run here: {problem}. "
                    f"Usable for {device.type} tensors: {', '.join(usable)}"
                )
            return forced
        for backend in self.auto_order.get(device.type, ("torch",)):
            if self._call_problem(backend, device, args, kwargs) is None:
                return backend
        return "torch"

    def __call__(self, device: torch.device, *args, **kwargs):
        backend = self.select(device, args, kwargs)
        if _trace is not None:
            _trace.append((self.name, backend))
        return self.impls[backend](*args, **kwargs)


# The default `auto` order: the extension's kernels for the small latency-bound ops, then Triton, then the reference.
NATIVE_FIRST = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
