"""What the static GPU check compiles: one CompileSpec per (kernel, launch config) a launcher can use.

Each kernel module defines `compile_specs() -> list[CompileSpec]`, built from the same config function its launcher
calls, so that the configs checked are the configs launched. `python -m qwen_fast.gpu_check` compiles every spec
for sm_80 and sm_90 without a GPU and reports registers, shared memory and spills.
"""

from dataclasses import dataclass, field

import torch

# Triton's names for the dtypes qwen_fast kernels take.
TRITON_DTYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass(frozen=True)
class CompileSpec:
    """A @triton.jit kernel with a full signature ("*fp16", "i64", "constexpr", ...) and its launch options.
    `aligned` names the arguments the JIT would see as multiples of 16 (16-byte aligned pointers, strides) at the
    launches the spec stands for; `archs` the compute capabilities (80, 90) whose launches pick it."""

    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int = 2
    label: str = field(default="")
    aligned: tuple[str, ...] = ()
    archs: tuple[int, ...] = ()  # the SM versions whose launches pick this config (empty: every one)
