import os
import random

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA, and `interpret` tests (Triton on CPU tensors) without TRITON_INTERPRET=1."""
    has_cuda = torch.cuda.is_available()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "interpret" in item.keywords and not interpret:
            item.add_marker(pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed, so failures reproduce."""
    random.seed(0)
    torch.manual_seed(0)
    yield
