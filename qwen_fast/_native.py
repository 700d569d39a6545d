"""Loads qwen_fast._C, the C++/CUDA extension, when it was built; qwen_fast works without it.

torch is imported first (the extension links against it). Without the extension the `cpu` and `cuda` backends are
unavailable and a warning says how to build them; the `triton` and `torch` backends keep working.
"""

import functools
import warnings
from pathlib import Path

import torch

try:
    from qwen_fast import _C  # noqa: F401  (loading the library registers torch.ops.qwen_fast.*)

    LOAD_ERROR: str | None = None
except ImportError as error:
    LOAD_ERROR = str(error)
    if (Path(__file__).parents[1] / "csrc").is_dir():
        LOAD_ERROR += f" - qwen_fast was imported from its source tree {Path(__file__).parent}, not the installed copy"
    warnings.warn(
        f"qwen_fast: the C++ extension qwen_fast._C is not available ({error}); the 'cpu' and 'cuda' backends are "
        "disabled. Build it with `pip install --no-build-isolation .` in the source tree.",
        stacklevel=2,
    )


@functools.cache  # registrations happen when the extension loads and never change afterwards
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered a `dispatch_key` ("CPU" or "CUDA") kernel for torch.ops.qwen_fast.<op>."""
    if LOAD_ERROR is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"qwen_fast::{op}", dispatch_key)
    except RuntimeError:  # no such operator
        return False
