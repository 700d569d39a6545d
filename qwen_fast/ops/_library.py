"""Registration of the ops with torch.library: the Triton ops' schemas (namespace qwen_fast_triton) and the fakes.

The Triton ops are defined with a torch.library.Library (define + impl per dispatch key + register_fake), the leanest
registration that passes torch.library.opcheck and torch.compile(fullgraph=True) under TRITON_INTERPRET=1: a call
goes through the C++ dispatcher straight to the launcher, where torch.library.custom_op adds its Python wrappers
(about 2.5x the per-call cost, bench/bench_dispatch.py). Mutated tensors are marked in the schema (`Tensor(a!)`).
The extension's ops (namespace qwen_fast, schemas in csrc/torch_bindings.cpp) get their fakes here too.
"""

import importlib
from collections.abc import Callable

import torch

from qwen_fast import _native

TRITON = torch.library.Library("qwen_fast_triton", "FRAGMENT")


def launcher(module: str, name: str) -> Callable:
    """The launcher `name` of kernels module `module` (e.g. "routing"), imported at its first call: importing
    qwen_fast.kernels needs triton, which qwen_fast does not."""
    found: list[Callable] = []

    def launch(*args):
        if not found:
            found.append(getattr(importlib.import_module(f"qwen_fast.kernels.{module}"), name))
        return found[0](*args)

    return launch


def define_triton_op(schema: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Defines qwen_fast_triton::<name> from `schema`, runs `impl` on CPU (the interpreter) and CUDA tensors, with
    `fake` for tracing; returns the op (torch.ops.qwen_fast_triton.<name>.default)."""
    name = schema.partition("(")[0]
    TRITON.define(schema)
    for dispatch_key in ("CPU", "CUDA"):
        TRITON.impl(name, impl, dispatch_key)
    torch.library.register_fake(f"qwen_fast_triton::{name}", fake, lib=TRITON)
    return getattr(torch.ops.qwen_fast_triton, name).default


def native_op(name: str, fake: Callable) -> Callable:
    """torch.ops.qwen_fast.<name> with `fake` registered, when the extension is built; else a stand-in that says it
    is not (the dispatcher never picks the cpu or cuda backend then)."""
    if _native.LOAD_ERROR is None:
        torch.library.register_fake(f"qwen_fast::{name}")(fake)
        return getattr(torch.ops.qwen_fast, name).default

    def missing(*args, **kwargs):
        raise RuntimeError(f"torch.ops.qwen_fast.{name} is not built: {_native.LOAD_ERROR}")

    return missing
