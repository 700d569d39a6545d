"""reshape_and_cache: new K/V rows into the paged pools, per backend, in GB/s (bytes read + written); and
flash_attn_with_kvcache decode (one query per sequence over a paged cache) against torch SDPA and, on CUDA where it is
installed (the baseline there), flash-attn's own decode over a contiguous cache of the same data, in GB/s of K/V
read.

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
        op="reshape_and_cache",
        shape=f"N={num_tokens} {str(dtype)[6:]}",
        impl=f"qwen_fast.{backend}",
        baseline="qwen_fast.torch",
        gb_per_s=moved / benchmark.stats["mean"] / 1e9,
    )


# --- flash_attn_with_kvcache decode: one query token per sequence over a paged cache, GB/s of K/V read ------------

DECODE_HEADS_Q, DECODE_HEADS_KV = (32, 4) if DEVICE == "cuda" else (16, 2)  # Qwen3-30B-A3B; group 8 on CPU
DECODE_BATCH = [1, 16, 64] if DEVICE == "cuda" else [1, 8]
DECODE_CONTEXT = [512, 4096, 32768] if DEVICE == "cuda" else [512, 4096]
DECODE_PEERS = ["triton", "torch", "sdpa", "flash_attn"] if DEVICE == "cuda" else ["cpu", "torch", "sdpa"]
try:  # the CUDA baseline where installed: flash-attn's decode over a contiguous cache of the same data
    from flash_attn import flash_attn_with_kvcache as flash_attn_peer
except ImportError:
    flash_attn_peer = None
DECODE_BASELINE = "flash_attn" if flash_attn_peer is not None and DEVICE == "cuda" else "torch_sdpa"


def _decode_inputs(batch: int, context: int, dtype: torch.dtype):
    """q [B, 1, Hq, D], a shuffled paged pool holding `context` tokens per sequence, and the same K/V contiguous
    in SDPA's layout [B, Hkv, context, D]."""
    blocks = context // BLOCK_SIZE
    shape = (batch * blocks, BLOCK_SIZE, DECODE_HEADS_KV, HEAD_DIM)
    k_cache = torch.randn(shape, device=DEVICE).to(dtype)
    v_cache = torch.randn(shape, device=DEVICE).to(dtype)
    block_table = torch.randperm(batch * blocks, device=DEVICE).view(batch, blocks).int()
    q = torch.randn(batch, 1, DECODE_HEADS_Q, HEAD_DIM, device=DEVICE).to(dtype)
    seqlens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    dense_k, dense_v = (c[block_table.long()].flatten(1, 2).transpose(1, 2).contiguous() for c in (k_cache, v_cache))
    return q, k_cache, v_cache, seqlens, block_table, dense_k, dense_v


@pytest.mark.parametrize("backend", DECODE_PEERS)
@pytest.mark.parametrize("context", DECODE_CONTEXT)
@pytest.mark.parametrize("batch", DECODE_BATCH)
def test_paged_decode(benchmark, backend, batch, context):
    if backend == "flash_attn" and flash_attn_peer is None:
        pytest.skip("flash-attn is not installed")
    q, k_cache, v_cache, seqlens, block_table, dense_k, dense_v = _decode_inputs(batch, context, torch.bfloat16)
    peer = backend in ("sdpa", "flash_attn")
    if backend == "sdpa":  # the peer: torch SDPA over a contiguous cache of the same data
        q_sdpa = q.transpose(1, 2)

        def attend():
            return torch.nn.functional.scaled_dot_product_attention(q_sdpa, dense_k, dense_v, enable_gqa=True)
    elif backend == "flash_attn":  # flash-attn's own decode over the same data, contiguous [B, L, Hkv, D]
        flash_k, flash_v = dense_k.transpose(1, 2).contiguous(), dense_v.transpose(1, 2).contiguous()

        def attend():
            return flash_attn_peer(q, flash_k, flash_v, cache_seqlens=seqlens, causal=True)
    else:

        def attend():
            return qwen_fast.flash_attn_with_kvcache(
                q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table, causal=True
            )

    def run():
        attend()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    with qwen_fast.use_backend("auto" if peer else backend), qwen_fast.record_backends() as calls:
        benchmark(run)
    assert peer or (calls and {b for _, b in calls} == {backend})
    read = 2 * dense_k.numel() * dense_k.element_size()  # K and V, each read once
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        backend=backend,
        op="flash_attn_with_kvcache decode",
        shape=f"B={batch} context={context}",
        impl={"sdpa": "torch_sdpa", "flash_attn": "flash_attn"}.get(backend, f"qwen_fast.{backend}"),
        baseline=DECODE_BASELINE,
        gb_per_s=read / benchmark.stats["mean"] / 1e9,
    )
