"""Backend choice: cuda (C++ extension), triton, flash_attn (the flash-attn package, optional: the three attention
ops on CUDA, flash_attn_backend.py), cpu (C++ extension), torch (the reference).

`auto` takes the first usable backend in the op's order for the tensors' device type. `QWEN_FAST_BACKEND=<name>` or
`with qwen_fast.use_backend(name):` force one; forcing a backend the op lacks, or one that cannot run on the
tensors' device here, raises an error that names the op and the backends that would work. Nothing falls back
silently. `record_backends()` lists which backend ran each op call (the tests use it to prove what ran).

Cost. An op call is a dictionary lookup: each Op caches its choice per (device, forced name); it depends only on the
device type and the forced name (the dtype does not enter: every backend takes every dtype the op's contract allows),
and the key is the torch.device itself because reading `device.type` costs more than the whole lookup. The
availability probes (the extension's registry, the triton import, TRITON_INTERPRET) run once per cache entry.
A cached route is (backend, the per-call checks on the arguments it needs): none for torch; for a kernel backend
`kernel_limit` (a size the kernels cannot take, e.g. fused_topk's E > 1024) and, for triton under the interpreter,
`interpreter_limit`. `use_backend` only switches which cache entry is read: nesting it and leaving it invalidate
nothing.

Per-call refusals (the choice is cached, these are not), one rule for all three: `auto` takes the torch reference,
a forced kernel backend is an error naming the op, the reason and the backends that can run the call. One more,
`backend_limits`, is a backend's own (flash-attn's dtypes, head dims, page sizes): `auto` then runs the next usable
backend of the op's order (triton), and forcing that backend is the same error.
- kernel_limit: arguments past what the kernels take.
- interpreter_limit: Triton's interpreter (CPU tensors, TRITON_INTERPRET=1) gets bfloat16 wrong in two ways: tl.dot
  multiplies the raw bits (results off by orders of magnitude: the attention and MoE GEMM kernels), and casts to bf16
  round differently from PyTorch (results several bf16 units off: the RoPE kernels). Those ops carry the limit and
  refuse bf16 there; the others (fused_topk, moe_align_block_size, reshape_and_cache) are bit-exact or within the
  tolerance table in bf16 under the interpreter, and run (tests/test_dispatch.py checks both sides).
- autograd: the kernel backends (cuda, triton, cpu) have no backward. A call with grad mode on and a tensor argument
  that requires grad would give outputs with no gradient path, so it is refused (forced) or runs on the torch
  reference, whose ops are differentiable (auto, with a one-time warning that says how to get the kernels:
  torch.no_grad() or torch.inference_mode()). In the decode path (generate runs under no_grad) the check is one
  torch.is_grad_enabled() call.

Environment. QWEN_FAST_BACKEND is read once, when qwen_fast is imported, and TRITON_INTERPRET when a choice is
first made (Triton itself reads it when its kernels are defined). Forcing a backend afterwards is use_backend's job;
a program (or a test) that changes either variable later calls `reread_environment()`, which reads them again and
forgets every cached choice.

torch.compile. Under Dynamo the choice is a constant of the graph (assume_constant_result over the op name, device
and forced name): the graph guards only on the forced name, which changes only where use_backend changes it. The
per-call checks run while tracing; what they read (dtypes, requires_grad, grad mode) Dynamo guards on anyway.
"""

import contextlib
import importlib
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.compiler import is_dynamo_compiling

from qwen_fast import _native

BACKENDS = ("cuda", "triton", "flash_attn", "cpu", "torch")
ENV = "QWEN_FAST_BACKEND"
_env_backend = os.environ.get(ENV, "auto")  # validated when first used: a bad value fails every op call, by name
_override: str | None = None  # the innermost use_backend(name)
_forced = _env_backend  # what op calls read: _override, else the environment's choice ("auto": none forced)
_trace: list[tuple[str, str]] | None = None
_OPS: "weakref.WeakSet[Op]" = weakref.WeakSet()  # every Op, so that reread_environment() can clear their caches
_BY_NAME: "weakref.WeakValueDictionary[str, Op]" = weakref.WeakValueDictionary()  # for the compiled path


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS + ('auto',))}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force `name` ("cuda", "triton", "cpu", "torch" or "auto") for every qwen_fast op called inside the block.
    Blocks nest; leaving one restores the enclosing choice (or QWEN_FAST_BACKEND's).

    >>> with qwen_fast.use_backend("torch"):
    ...     weights, ids, _ = qwen_fast.fused_topk(torch.randn(4, 16), torch.randn(4, 8), topk=2)
    """
    global _override, _forced
    previous, _override = _override, _check_name(name, "use_backend(name)")
    _forced = _override
    try:
        yield
    finally:
        _override = previous
        _forced = _env_backend if previous is None else previous


def forced_backend() -> str | None:
    """The backend forced by use_backend() or QWEN_FAST_BACKEND, or None for auto."""
    name = _check_name(_forced, "use_backend(name)" if _override is not None else ENV)
    return None if name == "auto" else name


def reread_environment() -> None:
    """Read QWEN_FAST_BACKEND and TRITON_INTERPRET again and forget every cached backend choice (see the module
    docstring: for programs and tests that change the environment after importing qwen_fast)."""
    global _env_backend, _forced
    _env_backend = os.environ.get(ENV, "auto")
    _forced = _env_backend if _override is None else _override
    for op in list(_OPS):
        op._routes.clear()


@contextlib.contextmanager
def record_backends() -> Iterator[list[tuple[str, str]]]:
    """Collects (op, backend) for every qwen_fast op call inside the block (composite ops: theirs and their parts')."""
    global _trace
    previous, _trace = _trace, []
    try:
        yield _trace
    finally:
        _trace = previous


def _triton_problem(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "triton runs CPU tensors only under TRITON_INTERPRET=1"
    return f"triton does not run on {device_type} tensors"


def _flash_attn_problem(device: torch.device | str) -> str | None:
    """Why the flash_attn backend (the flash-attn package's CUDA kernels, optional: see flash_attn_backend.py)
    cannot run here, or None."""
    device_type = device if isinstance(device, str) else device.type
    if device_type != "cuda":
        return f"the flash_attn backend runs CUDA tensors (flash-attn's kernels), got {device_type} tensors"
    try:
        importlib.import_module("flash_attn")
    except ImportError as error:
        return f"flash-attn is not importable ({error})"
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8:
        return "flash-attn 2 needs an sm_80 or newer GPU"
    return None


def _native_problem(op: str, backend: str, device_type: str) -> str | None:
    key = backend.upper()
    if device_type != backend:
        return f"the {backend} backend runs {backend} tensors, got {device_type} tensors"
    if not _native.has_kernel(op, key):
        if _native.LOAD_ERROR is not None:
            return f"the C++ extension is not built ({_native.LOAD_ERROR})"
        return f"the C++ extension was built without its {key} kernels"
    return None


@dataclass(frozen=True)
class InterpreterLimit:
    """What Triton's interpreter gets right for an op's Triton kernel: `dtypes`, and why not the others."""

    dtypes: tuple[torch.dtype, ...]
    reason: str

    def problem(self, op: str, dtype: torch.dtype) -> str | None:
        if dtype in self.dtypes:
            return None
        return (
            f"Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) cannot run {op} on {dtype}: it {self.reason}; "
            f"there the triton backend takes {', '.join(str(d) for d in self.dtypes)} for this op ({dtype} runs on "
            "the cpu and cuda backends and the torch reference)"
        )


# Op(..., interpreter_limit=...) for the ops whose Triton kernels the interpreter gets wrong in bf16 (module docstring).
INTERPRETER_DOT = InterpreterLimit(
    (torch.float32, torch.float16),
    "multiplies bf16 in tl.dot from the raw bits (triton#11584), so the results are silently wrong",
)
INTERPRETER_CASTS = InterpreterLimit(
    (torch.float32, torch.float16),
    "rounds casts to bf16 differently from PyTorch, so the results are several bf16 units off the reference",
)


def _needs_grad(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def _grad_problem(backend: str) -> str:
    return (
        f"a tensor argument requires grad and grad mode is on, but the {backend} kernels have no backward (the "
        "outputs would carry no gradient); run inference under torch.no_grad() or torch.inference_mode(), or use "
        "the torch backend (qwen_fast.use_backend('torch')), whose reference ops are differentiable"
    )


Limits = tuple[Callable[..., str | None], ...] | None  # a route's per-call checks; None: the torch backend's none


@dataclass(frozen=True, eq=False)
class Op:
    """One public op: its implementations per backend and the order `auto` tries them in, per device type.

    `OP(device, *args, **kwargs)` runs the op on the chosen backend with arguments already checked: the unchecked,
    dispatched entry that the public function (after its checks), qwen_fast.nn and qwen_fast.cache call.
    `native_op` names the extension op whose kernels the cpu/cuda backends run (default: the op's own name; a
    composite such as fused_moe runs fused_experts'). `kernel_limit(*args, **kwargs)` says why the kernel backends
    (all but torch) cannot take a call's arguments, or None: `auto` then takes torch, and forcing one is an error.
    `interpreter_limit`: the dtypes its Triton kernel gets right under TRITON_INTERPRET=1 (None: every dtype the op
    takes); the others are refused the same way (module docstring). `backend_limits[backend](*args, **kwargs)`:
    why that one backend cannot take a call (auto then takes the next backend of its order)."""

    name: str
    impls: dict[str, Callable]
    auto_order: dict[str, tuple[str, ...]]
    native_op: str = ""
    kernel_limit: Callable[..., str | None] | None = None
    interpreter_limit: InterpreterLimit | None = None
    backend_limits: dict[str, Callable[..., str | None]] = field(default_factory=dict)
    _routes: dict[tuple[torch.device, str], tuple[str, Limits]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _OPS.add(self)
        _BY_NAME[self.name] = self

    def problem(self, backend: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str | None:
        """None when `backend` can run this op on `device` (or a device type) here, else why not; with `dtype`, also
        for tensors of that dtype (the interpreter's tl.dot limit)."""
        device_type = device if isinstance(device, str) else device.type
        if backend not in self.impls:
            return f"{self.name} has no {backend} backend (it has: {', '.join(self.impls)})"
        if backend == "torch":
            return None
        if backend == "flash_attn":
            return _flash_attn_problem(device)
        if backend == "triton":
            problem = _triton_problem(device_type)
            limit = self.interpreter_limit if device_type == "cpu" else None
            if problem is None and limit is not None and dtype is not None:
                problem = limit.problem(self.name, dtype)
            return problem
        return _native_problem(self.native_op or self.name, backend, device_type)

    def _interpreter_check(self, *args, **kwargs) -> str | None:
        """The per-call check of a triton route on CPU tensors (the interpreter): every floating-point tensor
        argument in a dtype the interpreter gets right for this op."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                problem = self.interpreter_limit.problem(self.name, value.dtype)
                if problem is not None:
                    return problem
        return None

    def _limits(self, backend: str, device_type: str) -> Limits:
        """The per-call checks a route on `backend` for `device_type` tensors needs (None for torch)."""
        if backend == "torch":
            return None
        limits = () if self.kernel_limit is None else (self.kernel_limit,)
        if backend in self.backend_limits:
            limits += (self.backend_limits[backend],)
        if backend == "triton" and device_type == "cpu" and self.interpreter_limit is not None:
            limits += (self._interpreter_check,)
        return limits

    def _forced_error(self, forced: str, device: torch.device, problem: str, kernels_too: bool = False) -> RuntimeError:
        """`kernels_too`: no kernel backend takes this call's arguments (a kernel limit, a need for gradients)."""
        usable = [
            b
            for b in self.impls
            if b != forced and self.problem(b, device) is None and (b == "torch" or not kernels_too)
        ]
        return RuntimeError(
            f"qwen_fast.{self.name}: backend {forced!r} is forced but cannot run here: {problem}. "
            f"Usable for {device.type} tensors: {', '.join(usable)}"
        )

    def _route(self, device: torch.device, forced: str) -> tuple[str, Limits]:
        """The route (backend, per-call checks) for (device, forced name), resolved and cached on first use."""
        if forced == "auto":
            order = self.auto_order.get(device.type, ("torch",))
            backend = next((b for b in order if self.problem(b, device) is None), "torch")
        else:
            _check_name(forced, ENV)  # use_backend checks its name: only the environment can hold a bad one
            problem = self.problem(forced, device)
            if problem is not None:
                raise self._forced_error(forced, device, problem)
            backend = forced
        route = self._routes[device, forced] = (backend, self._limits(backend, device.type))
        return route

    def _next_backend(self, backend: str, device: torch.device) -> str:
        """The first usable backend after `backend` in auto's order for `device` (cached like a route)."""
        key = (device, "after " + backend)
        if key not in self._routes:
            order = self.auto_order.get(device.type, ("torch",))
            later = order[order.index(backend) + 1 :] if backend in order else ()
            found = next((b for b in later if self.problem(b, device) is None), "torch")
            self._routes[key] = (found, self._limits(found, device.type))
        return self._routes[key][0]

    def _admit(self, backend: str, limits: tuple, forced: str, device: torch.device, args: tuple, kwargs: dict) -> str:
        """`backend` when it can take these arguments; else torch under auto, and an error when it is forced. A
        backend's own limit (backend_limits: an optional library's constraints) sends auto to the next backend of
        its order instead."""
        own = self.backend_limits.get(backend)
        if own is not None and own in limits:
            problem = own(*args, **kwargs)
            if problem is not None:
                if forced != "auto":
                    raise self._forced_error(forced, device, problem)
                backend = self._next_backend(backend, device)
                limits = self._limits(backend, device.type)
                if limits is None or not (limits or torch.is_grad_enabled()):
                    return backend
        problem = self.kernel_limit(*args, **kwargs) if self.kernel_limit in limits else None
        kernels_too = problem is not None
        if problem is None and self._interpreter_check in limits:
            problem = self._interpreter_check(*args, **kwargs)
        needs_grad = problem is None and torch.is_grad_enabled() and _needs_grad(args, kwargs)
        if needs_grad:
            problem, kernels_too = _grad_problem(backend), True
        if problem is None:
            return backend
        if forced != "auto":
            raise self._forced_error(forced, device, problem, kernels_too)
        if needs_grad and not is_dynamo_compiling():
            warnings.warn(
                f"qwen_fast.{self.name}: a tensor argument requires grad (grad mode on), so the call runs on the "
                "differentiable torch reference instead of the kernels, which have no backward; run inference under "
                "torch.no_grad() or torch.inference_mode() to use the kernels",
                stacklevel=3,
            )
        return "torch"

    def select(self, device: torch.device) -> str:
        """The backend calls on `device` run on (the cached choice; a call's per-call checks may still send it to
        torch under auto, or refuse it when forced)."""
        return (self._routes.get((device, _forced)) or self._route(device, _forced))[0]

    def __call__(self, device: torch.device, *args, **kwargs):
        forced = _forced  # the per-call path of every op: no helper calls (tests/test_decode_step.py counts them)
        if is_dynamo_compiling():
            backend = _traced_route(self.name, device, forced)
            limits = self._limits(backend, device.type)
        else:
            backend, limits = self._routes.get((device, forced)) or self._route(device, forced)
        if limits is not None and (limits or torch.is_grad_enabled()):
            backend = self._admit(backend, limits, forced, device, args, kwargs)
        if _trace is not None:
            _trace.append((self.name, backend))
        return self.impls[backend](*args, **kwargs)


@torch.compiler.assume_constant_result
def _traced_route(name: str, device: torch.device, forced: str) -> str:
    """Op `name`'s backend, evaluated once while Dynamo traces: a constant of the graph, with no guard of its own."""
    op = _BY_NAME[name]
    return (op._routes.get((device, forced)) or op._route(device, forced))[0]


# The default `auto` order: the extension's kernels for the small latency-bound ops, then Triton, then the reference.
NATIVE_FIRST = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
