"""Loads qwen_fast._C, the C++/CUDA extension, when it was built; qwen_fast works without it.

torch is imported first (the extension links against it). Without the extension the `cpu` and `cuda` backends are
unavailable and a warning says why and what to do (build it; or, when qwen_fast was imported from a source checkout
that shadows the installed copy, run from elsewhere or with `python -P`); the `triton` and `torch` backends keep
working.
"""

import functools
import importlib.metadata
import warnings
from pathlib import Path

import torch


def _shadowed_message(package: Path) -> str | None:
    """What happened when `package` is a source checkout's qwen_fast/ (csrc/ beside it) with no built _C: the
    checkout shadows any installed copy because Python put the current directory (or PYTHONPATH) first."""
    if not (package.parent / "csrc").is_dir() or any(package.glob("_C.*")):
        return None
    try:
        installed = f"the installed qwen-fast {importlib.metadata.version('qwen-fast')} is shadowed by it"
    except importlib.metadata.PackageNotFoundError:
        installed = "qwen-fast is not installed"
    return (
        f"qwen_fast was imported from the source tree {package} (Python puts the current directory, or PYTHONPATH, "
        f"ahead of site-packages), which has no built extension next to it; {installed}. Run from another directory, "
        "or with `python -P` (Python 3.11+), or build in place with `pip install --no-build-isolation -e .`"
    )


try:
    from qwen_fast import _C  # noqa: F401  (loading the library registers torch.ops.qwen_fast.*)

    LOAD_ERROR: str | None = None
except ImportError as error:
    shadowed = _shadowed_message(Path(__file__).parent)
    LOAD_ERROR = str(error) if shadowed is None else f"{error} - {shadowed}"
    advice = shadowed or "Build it with `pip install --no-build-isolation .` in the source tree"
    warnings.warn(
        f"qwen_fast: the C++ extension qwen_fast._C is not available ({error}); the 'cpu' and 'cuda' backends are "
        f"disabled and `auto` runs those ops on 'triton' or 'torch'. {advice}.",
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
