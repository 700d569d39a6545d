"""The dense projections of the decode step through qwen_fast's linear op.

`project(module, x)` is `module(x)` for a transformers nn.Linear (q/k/v/o), and `Linear` is an nn.Linear whose forward
does the same (qwen_fast.patch serves the LM head with it). On CPU tensors with at most DECODE_ROWS rows (decode: batch
x new tokens; fp32, see DECODE_ROWS) they call the LINEAR op, whose cpu kernel reads the weights once in place
(csrc/cpu/linear.cpp); otherwise (prefill, CUDA) F.linear, ATen's GEMM or cuBLAS, the faster path there. A module that
transformers' tensor parallelism runs (its instance forward replaced: _hf.is_distributed), or one with forward hooks, is
always called as itself.
"""

import torch
import torch.nn.functional as F
from torch import nn

from qwen_fast.ops import _dispatch
from qwen_fast.ops.linear import LINEAR, MAX_ROWS

_OP_RUNS = ("auto", "cpu", "torch")  # the forced names (use_backend, QWEN_FAST_BACKEND) under which the op runs
# Rows up to which the modules call the op, per dtype (others: never). fp32 only for now: in bf16/fp16 the kernel
# converts the weights into fp32 scratch, and ATen's bf16 GEMV (oneDNN with AVX512_BF16) was up to 2x faster at
# Qwen3-30B-A3B's shapes at M = 1 and 3-10x from M = 4 on (bench/bench_linear.py, Zen 4 VM); bf16 dot tiles that
# read the weights in their dtype change that.
DECODE_ROWS = {torch.float32: MAX_ROWS}


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): through the LINEAR op for at most DECODE_ROWS[dtype] rows of CPU tensors of one
    dtype, unless a backend the op lacks (triton, cuda) is forced: those runs test the other ops."""
    if (
        x.is_cpu
        and x.numel() <= DECODE_ROWS.get(x.dtype, 0) * x.shape[-1]
        and x.dtype == weight.dtype
        and _dispatch._forced in _OP_RUNS
    ):
        return LINEAR(x.device, x, weight, bias)
    return F.linear(x, weight, bias)


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for an nn.Linear [N, K] on x [*, K] -> [*, N]; a plain nn.Linear goes the way of decode_linear
    (its conditions inlined: this runs four times per decoder layer, where each Python call is host work)."""
    if (
        x.is_cpu
        and type(module) is nn.Linear
        and x.numel() <= DECODE_ROWS.get(x.dtype, 0) * x.shape[-1]
        and _dispatch._forced in _OP_RUNS
        and not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)
        and x.dtype == module.weight.dtype
    ):
        return LINEAR(x.device, x, module.weight, module.bias)
    return module(x)


class Linear(nn.Linear):
    """An nn.Linear (same parameters and state dict) whose forward is decode_linear: the LM head of a patched
    model. `from_hf(linear)` shares an nn.Linear's parameters (tied embeddings stay tied).

    Example:
        >>> head = Linear.from_hf(torch.nn.Linear(64, 100, bias=False))
        >>> with torch.no_grad(), qwen_fast.record_backends() as ran:
        ...     logits = head(torch.randn(1, 1, 64))
        >>> logits.shape, ran
        (torch.Size([1, 1, 100]), [('linear', 'cpu')])
    """

    @classmethod
    def from_hf(cls, linear: nn.Linear) -> "Linear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)
