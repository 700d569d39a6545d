"""linear (the decode step's dense projections) against ATen's F.linear, in GB/s of weights read, on CPU.

    pytest bench/bench_linear.py --benchmark-columns=mean,ops    (add -k "demo and M1" to narrow)

Shapes [N, K]: the demo model's (qwen_fast/configs/models/qwen3_moe_small.json: q 1024 x 512, k/v 256 x 512,
o 512 x 1024, LM head 8192 x 512, router 64 x 512) and Qwen3-30B-A3B's (q 4096 x 2048, k/v 512 x 2048,
o 2048 x 4096); M = 1, 4, 16 rows; fp32 and bf16. Both sides run on torch's thread count (set it with
OMP_NUM_THREADS or torch.set_num_threads). GB/s counts the weights alone (read once: the bound at M <= 16).
"""

import pytest
import torch

import qwen_fast

SHAPES = {
    "demo-q": (1024, 512), "demo-kv": (256, 512), "demo-o": (512, 1024), "demo-lm_head": (8192, 512),
    "demo-router": (64, 512), "30b-q": (4096, 2048), "30b-kv": (512, 2048), "30b-o": (2048, 4096),
}  # fmt: skip
IMPLS = {
    "qwen_fast": lambda x, w: qwen_fast.linear(x, w),
    "aten": lambda x, w: torch.nn.functional.linear(x, w),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("rows", [1, 4, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear(benchmark, impl, rows, shape, dtype):
    n, k = SHAPES[shape]
    x = torch.randn(rows, k).to(dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    fn = IMPLS[impl]
    with torch.no_grad(), qwen_fast.use_backend("cpu" if impl == "qwen_fast" else "auto"):
        benchmark(fn, x, w)
    weight_bytes = w.numel() * w.element_size()
    benchmark.extra_info.update(
        device=f"cpu, {torch.get_num_threads()} threads",
        op="linear",
        shape=f"{shape} N={n} K={k} M={rows} {str(dtype)[6:]}",
        impl=impl,
        baseline="aten",
        gb_per_s=weight_bytes / benchmark.stats["mean"] / 1e9,
    )
