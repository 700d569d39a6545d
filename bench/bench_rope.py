"""qk_norm_rope_and_cache (one pass) against the same work unfused, at Qwen3-30B-A3B attention shapes, in GB/s.

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_rope.py --benchmark-columns=mean,ops

Hq = 32, Hkv = 4, D = 128, bf16, block_size 16, the Qwen3-235B YaRN cos/sin table (fp32), positions up to 131071.
Per backend three ways of doing the same thing:
    fused      qwen_fast.qk_norm_rope_and_cache
    unfused    rms_norm of q, rms_norm of k (the reference's torch ops), qwen_fast.rotary_embedding and
               qwen_fast.reshape_and_cache on the same backend: four passes over the new q/k (and a copy of v, which
               arrives as a view of the qkv projection while reshape_and_cache wants k's strides)
    reference  qwen_fast.reference.qk_norm_rope_and_cache (plain torch, the unfused chain of eager ops)
GB/s counts the bytes the fused op must move: q, k, v read, q and k written, k and v written to the cache, plus the
token's cos/sin rows and the slots. T in {1, 16, 512} on CPU; on CUDA up to 16384 (device-synchronised).
"""

import pytest
import torch

import qwen_fast
from qwen_fast.reference import compute_cos_sin_cache, rms_norm
from qwen_fast.reference import qk_norm_rope_and_cache as reference_fused

HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK_SIZE, MAX_POSITION = 32, 4, 128, 16, 131072
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["cuda", "triton"] if DEVICE == "cuda" else ["cpu"]
TOKENS = [1, 16, 512, 4096, 16384] if DEVICE == "cuda" else [1, 16, 512]
_TABLE = {}


def _inputs(num_tokens: int, dtype: torch.dtype) -> dict:
    if DEVICE not in _TABLE:
        _TABLE[DEVICE] = compute_cos_sin_cache(HEAD_DIM, MAX_POSITION, 1e6, YARN).to(DEVICE)
    qkv = torch.randn(num_tokens, HEADS_Q + 2 * HEADS_KV, HEAD_DIM, device=DEVICE).to(dtype)
    query, key, value = qkv.split([HEADS_Q, HEADS_KV, HEADS_KV], dim=1)  # views of one projection, as in the model
    num_blocks = 2 * num_tokens // BLOCK_SIZE + 1
    key_cache = torch.zeros(num_blocks, BLOCK_SIZE, HEADS_KV, HEAD_DIM, device=DEVICE, dtype=dtype)
    return {
        "query": query, "key": key, "value": value,
        "q_norm_weight": torch.randn(HEAD_DIM, device=DEVICE).to(dtype),
        "k_norm_weight": torch.randn(HEAD_DIM, device=DEVICE).to(dtype), "eps": 1e-6,
        "positions": torch.randint(0, MAX_POSITION, (num_tokens,), device=DEVICE), "cos_sin_cache": _TABLE[DEVICE],
        "key_cache": key_cache, "value_cache": torch.zeros_like(key_cache),
        "slot_mapping": torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE)[:num_tokens],
    }  # fmt: skip


def _unfused(a: dict) -> None:
    query = rms_norm(a["query"], a["q_norm_weight"], a["eps"])
    key = rms_norm(a["key"], a["k_norm_weight"], a["eps"])
    qwen_fast.rotary_embedding(a["positions"], query, key, query.shape[-1], a["cos_sin_cache"], True)  # in place
    value = torch.empty_like(key).copy_(a["value"])  # reshape_and_cache takes key and value with equal strides
    qwen_fast.reshape_and_cache(key, value, a["key_cache"], a["value_cache"], a["slot_mapping"])


VARIANTS = {
    "fused": lambda a: qwen_fast.qk_norm_rope_and_cache(**a),
    "unfused": _unfused,
    "reference": lambda a: reference_fused(**a),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_qk_norm_rope_and_cache(benchmark, variant, backend, num_tokens, dtype):
    inputs = _inputs(num_tokens, dtype)
    fn = VARIANTS[variant]

    def run():
        fn(inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        benchmark(run)
    if variant != "reference":
        assert calls and {b for _, b in calls} == {backend}
    element = torch.finfo(dtype).bits // 8
    rows = num_tokens * (HEADS_Q + 2 * HEADS_KV) * HEAD_DIM
    moved = element * (rows + num_tokens * (HEADS_Q + 3 * HEADS_KV) * HEAD_DIM) + num_tokens * (HEAD_DIM * 4 + 16)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        backend=backend,
        variant=variant,
        op="qk_norm_rope_and_cache",
        shape=f"T={num_tokens} {str(dtype)[6:]}",
        impl="reference" if variant == "reference" else f"qwen_fast.{backend} {variant}",
        baseline="reference",
        gb_per_s=moved / benchmark.stats["mean"] / 1e9,
    )
