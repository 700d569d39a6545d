"""flash_attn_func prefill: qwen_fast's kernel for the device against torch SDPA, flash-attn (when importable) and
the reference, self-attention over S tokens, causal and not. The baseline is flash-attn on CUDA where it is
installed (torch SDPA otherwise); qwen_fast runs its triton backend forced (auto would take flash-attn there).

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_attention.py --benchmark-columns=median,ops

CUDA: bf16, head_dim 128, Qwen3-30B-A3B (32 / 4 heads) and Qwen3-235B-A22B (64 / 4) GQA, S = 512 ... 16k, the
triton backend. CPU: reduced shapes (B = 1, 8 / 2 heads, head_dim 128, S = 128, 512, 1024), the cpu backend.
`extra_info` records TFLOP/s counted as 4 * B * Hq * S * S * D (halved when causal: the visible half).
"""

import pytest
import torch
import torch.nn.functional as F

import qwen_fast
from qwen_fast.reference import attention as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEAD_DIM = 128
if DEVICE == "cuda":
    BACKEND = "triton"
    HEADS = [(32, 4), (64, 4)]
    SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
    DTYPES = [torch.bfloat16]
else:
    BACKEND = "cpu"
    HEADS = [(8, 2)]
    SEQLENS = [128, 512, 1024]
    DTYPES = [torch.float32, torch.bfloat16]

try:
    from flash_attn import flash_attn_func as flash_attn_peer
except ImportError:
    flash_attn_peer = None
BASELINE = "flash_attn" if flash_attn_peer is not None and DEVICE == "cuda" else "torch_sdpa"


def _sdpa(q, k, v, causal):
    """torch SDPA on [B, H, S, D] views of flash-attn's layout, GQA without repeating K/V (enable_gqa)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2)


def _qwen_fast(q, k, v, causal):
    return qwen_fast.flash_attn_func(q, k, v, causal=causal)


IMPLS = {
    "qwen_fast": _qwen_fast,
    "torch_sdpa": _sdpa,
    "flash_attn": lambda q, k, v, causal: flash_attn_peer(q, k, v, causal=causal),
    "reference": lambda q, k, v, causal: reference.flash_attn_func(q, k, v, causal=causal),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("heads_q, heads_kv", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_attn_prefill(benchmark, dtype, heads_q, heads_kv, seqlen, causal, impl):
    if impl == "flash_attn" and (flash_attn_peer is None or DEVICE != "cuda"):
        pytest.skip("flash-attn is not installed (or no CUDA device)")
    if impl == "reference" and DEVICE == "cuda" and seqlen > 4096:
        pytest.skip("the reference materialises [B, Hq, S, S] fp32 scores")
    q = torch.randn(1, seqlen, heads_q, HEAD_DIM, device=DEVICE).to(dtype)
    k = torch.randn(1, seqlen, heads_kv, HEAD_DIM, device=DEVICE).to(dtype)
    v = torch.randn(1, seqlen, heads_kv, HEAD_DIM, device=DEVICE).to(dtype)
    fn = IMPLS[impl]

    def run():
        fn(q, k, v, causal)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    with qwen_fast.use_backend(BACKEND), qwen_fast.record_backends() as calls:
        benchmark.pedantic(run, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1)
    if impl == "qwen_fast":
        assert calls and {b for _, b in calls} == {BACKEND}
    flops = 4 * heads_q * seqlen * seqlen * HEAD_DIM * (0.5 if causal else 1.0)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        op="flash_attn_func",
        shape=f"{str(dtype)[6:]} Hq={heads_q}/Hkv={heads_kv} S={seqlen}{' causal' if causal else ''}",
        impl=f"qwen_fast.{BACKEND}" if impl == "qwen_fast" else impl,
        baseline=BASELINE,
        tflops=flops / benchmark.stats["median"] / 1e12,
    )
