"""The one tolerance table of the test suite, and the flash-attn error budget.

The table lives in qwen_fast/cli/selftest.py, which the op harness (tests/test_ops.py) and `qwen-fast check` run
through; the per-op tests compare through `assert_close` (elementwise, keyed by dtype) or, for attention,
`assert_within_budget`, with the same numbers.
"""

import torch

from qwen_fast.cli.selftest import BUDGET_EPS, TOLERANCE

__all__ = ["TOLERANCE", "assert_close", "assert_within_budget"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Compare with the table's tolerance for `dtype` (default: the dtype of `actual`)."""
    atol, rtol = TOLERANCE[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


def assert_within_budget(
    out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowprec: torch.Tensor, eps: float = BUDGET_EPS
) -> None:
    """flash-attn's error budget: max|out - ref_fp32| <= 2 * max|ref_lowprec - ref_fp32| + eps.

    `ref_fp32` is the reference run on fp32 copies of the inputs; `ref_lowprec` the reference run in the inputs'
    own dtype. For fp32 inputs the budget reduces to `eps`.
    """
    err = (out.float() - ref_fp32.float()).abs().max().item() if out.numel() else 0.0
    base = (ref_lowprec.float() - ref_fp32.float()).abs().max().item() if out.numel() else 0.0
    budget = 2 * base + eps
    assert err <= budget, f"max abs error {err:.3e} exceeds the budget {budget:.3e} (2 * {base:.3e} + {eps:.0e})"
