"""`python -m qwen_fast`: the environment, and which backends are built and usable for each op."""

import platform

import torch

import qwen_fast
from qwen_fast.ops.report import format_backends


def main() -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"qwen_fast {qwen_fast.__version__} on Python {platform.python_version()}, {platform.machine()}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), triton {triton_version}, GPU: {gpu}")
    extension = qwen_fast._native.LOAD_ERROR or "loaded"
    print(f"extension qwen_fast._C: {extension}\n")
    print(format_backends(qwen_fast.backends()))


if __name__ == "__main__":
    main()
