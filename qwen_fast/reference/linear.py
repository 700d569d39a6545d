"""Reference linear projection: F.linear in the input's dtype.

    out = input @ weight^T (+ bias),   products summed in fp32, one rounding to the dtype at the end

ATen's CPU and CUDA GEMMs accumulate fp16/bf16 products in fp32 and round the result once (the bias added before
that rounding), which is the contract the cpu kernel (csrc/cpu/linear.cpp) keeps; fp32 differs from it only in the
order of the sum. This is exactly what transformers' nn.Linear projections (q/k/v/o, the routers' gate, the LM
head) compute.
"""

import torch
import torch.nn.functional as F


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """input [*, K] . weight [N, K]^T (+ bias [N]) -> [*, N], all three in one dtype (fp32, bf16 or fp16).

    Example:
        >>> linear(torch.ones(2, 3), torch.ones(4, 3), torch.arange(4.0)).tolist()
        [[3.0, 4.0, 5.0, 6.0], [3.0, 4.0, 5.0, 6.0]]
    """
    return F.linear(input, weight, bias)
