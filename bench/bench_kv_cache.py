"""reshape_and_cache: new K/V rows into the paged pools, per backend, in GB/s (bytes read + written).

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_kv_cache.py --benchmark-columns=mean,ops

Qwen3-MoE attention layers write Hkv = 4 heads of D = 128 per token; block_size 16. On CPU the reduced token
counts keep a run short; on CUDA the same tests time the cuda and triton kernels (device-synchronised).
"""

import pytest
import torch

import qwen_fast

HEADS, HEAD_DIM, BLOCK_SIZE = 4, 128, 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["cuda", "triton", "torch"] if DEVICE == "cuda" else ["cpu", "torch"]
TOKENS = [1, 64, 4096] if DEVICE == "cuda" else [1, 64, 1024]


def _inputs(num_tokens: int, dtype: torch.dtype):
    key = torch.randn(num_tokens, HEADS, HEAD_DIM, device=DEVICE).to(dtype)
    value = torch.randn_like(key)
    num_blocks = 2 * num_tokens // BLOCK_SIZE + 1
    key_cache = torch.zeros(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE)[:num_tokens]
    return key, value, key_cache, torch.zeros_like(key_cache), slots


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_reshape_and_cache(benchmark, backend, num_tokens, dtype):
    inputs = _inputs(num_tokens, dtype)

    def run():
        qwen_fast.reshape_and_cache(*inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        benchmark(run)
    assert calls and {b for _, b in calls} == {backend}
    moved = 2 * 2 * inputs[0].numel() * inputs[0].element_size() + inputs[4].numel() * 8  # K and V read + write
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        backend=backend,
        gb_per_s=moved / benchmark.stats["mean"] / 1e9,
    )
