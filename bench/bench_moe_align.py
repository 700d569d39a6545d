"""moe_align_block_size: the routing of T tokens (Qwen3-30B-A3B: E = 128, k = 8) sorted into GEMM blocks, per
backend, with the block size the grouped GEMM would use (choose_block_size).

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_moe_align.py --benchmark-columns=mean,ops

T = 1 is a decode step, where launch latency is all there is; T = 16384 is a long prefill (131,072 ids, the
multi-pass CUDA path). On CUDA the same tests time the cuda and triton kernels (device-synchronised).
"""

import pytest
import torch

import qwen_fast
from qwen_fast.ops.moe_align import choose_block_size

NUM_EXPERTS, TOPK = 128, 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["cuda", "triton", "torch"] if DEVICE == "cuda" else ["cpu", "torch"]
TOKENS = [1, 64, 2048, 16384]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_moe_align_block_size(benchmark, backend, num_tokens):
    topk_ids = torch.rand(num_tokens, NUM_EXPERTS, device=DEVICE).argsort(-1)[:, :TOPK].int()
    block_size = choose_block_size(num_tokens, TOPK, NUM_EXPERTS)

    def run():
        qwen_fast.moe_align_block_size(topk_ids, block_size, NUM_EXPERTS)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        benchmark(run)
    assert calls and {b for _, b in calls} == {backend}
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        backend=backend,
        op="moe_align_block_size",
        shape=f"T={num_tokens}",
        impl=f"qwen_fast.{backend}",
        baseline="qwen_fast.torch",
        block_size=block_size,
        ids_per_us=topk_ids.numel() / benchmark.stats["mean"] / 1e6,
    )
