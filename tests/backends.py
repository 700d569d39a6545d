"""The test suite's backend matrix, in one place: (device of the tensors, backend, marks).

cpu and torch on CPU tensors always; triton on CPU tensors only under TRITON_INTERPRET=1 (`interpret`); cuda,
triton and torch on CUDA tensors where CUDA exists (`gpu`). The op harness (test_ops.py) runs every op over it; the
per-op tests that check a property of every backend (not a comparison with the reference) take backend_params.
"""

import pytest

from qwen_fast.ops import OPS

BACKENDS = [
    ("cpu", "cpu", ()),
    ("cpu", "torch", ()),
    ("cpu", "triton", (pytest.mark.interpret,)),
    ("cuda", "cuda", (pytest.mark.gpu,)),
    ("cuda", "triton", (pytest.mark.gpu,)),
    ("cuda", "torch", (pytest.mark.gpu,)),
]


def backend_params(op: str, kernels_only: bool = False) -> list:
    """pytest params (backend, device) for every backend `op` has (without torch when kernels_only)."""
    return [
        pytest.param(backend, device, marks=marks, id=f"{backend}-{device}")
        for device, backend, marks in BACKENDS
        if backend in OPS[op].impls and not (kernels_only and backend == "torch")
    ]
