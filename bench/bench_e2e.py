"""End to end: one prefill and one decode step of a whole Qwen3-MoE model (random weights), patched by qwen_fast
against transformers unpatched, on the same weights.

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_e2e.py --benchmark-columns=median,ops

Timed, each a single model forward under torch.no_grad() returning the last position's logits (as generate asks),
device-synchronised:
  test_prefill: B prompts of P tokens into an empty cache (the cache is emptied before each round, untimed);
  test_decode: one new token per sequence after a context of L tokens held in the cache: the step writes position L
    and attends over L + 1 keys. Before each round the cache is cropped back to L tokens (untimed), so rounds do not
    grow it. Position L starts a new page of the paged cache (L is a multiple of block_size 16): the step pays a
    page allocation, which 1 decode step in 16 does.
Implementations:
  "qwen_fast": qwen_fast.patch(model) (qwen_fast.nn.SparseMoeBlock and GQAAttention, the ops' `auto` backends) with a
    qwen_fast.PagedKVCache.for_model(model, max_batch=B) holding the context;
  "transformers.grouped_mm" (transformers' default experts implementation: the baseline) and "transformers.eager",
    unpatched, with transformers' DynamicCache and its default attention (sdpa).
Shapes: on CUDA the Qwen3-30B-A3B decoder layer (hidden 2048, 128 experts top-8, moe_intermediate 768, 32 / 4 heads of
128, vocab 151936) with 2 layers, bf16, B in {1, 32}, P = 512, L = 2048. On CPU the small Qwen3-MoE shipped as
qwen_fast/configs/models/qwen3_moe_small.json (quarter width, 64 experts top-8, 4 layers), fp32 and bf16, B in
{1, 8}, P = 128, L = 256.

extra_info: op ("e2e_prefill" / "e2e_decode"), shape, impl, baseline (the qwen-fast bench convention), device,
tokens_per_s (B * P per prefill, B per decode step) and ms (the median), and for qwen_fast the backends its ops ran.
"""

import contextlib
import functools

import pytest
import torch

import qwen_fast
from qwen_fast.configs.models import config_kwargs

transformers = pytest.importorskip("transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    # Qwen3-30B-A3B's config.json, 2 of its 48 layers.
    CONFIG = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )  # fmt: skip
    DTYPES, BATCHES, PROMPT, CONTEXT = ["bfloat16"], [1, 32], 512, 2048
    PREFILL_ROUNDS, DECODE_ROUNDS = 20, 50
else:
    CONFIG = config_kwargs()
    DTYPES, BATCHES, PROMPT, CONTEXT = ["float32", "bfloat16"], [1, 8], 128, 256
    PREFILL_ROUNDS, DECODE_ROUNDS = 5, 20
IMPLS = ["qwen_fast", "transformers.grouped_mm", "transformers.eager"]
BASELINE = "transformers.grouped_mm"


@functools.cache
def _model(dtype_name: str) -> torch.nn.Module:
    """The seeded random model in `dtype_name` (parametrized by name: pytest-benchmark's JSON keeps strings), shared
    by every implementation of that dtype."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**CONFIG))
    return model.to(getattr(torch, dtype_name)).eval()


@contextlib.contextmanager
def _running(model: torch.nn.Module, impl: str):
    """Inside the block `model` runs as `impl`; yields a function that makes an empty cache for a batch."""
    if impl == "qwen_fast":
        with qwen_fast.patch(model):
            yield lambda batch: qwen_fast.PagedKVCache.for_model(model, max_batch=batch)
        return
    model.set_experts_implementation(impl.removeprefix("transformers."))
    try:
        yield lambda batch: transformers.DynamicCache(config=model.config)
    finally:
        model.set_experts_implementation(BASELINE.removeprefix("transformers."))


def _forward(model: torch.nn.Module, tokens: torch.Tensor, cache) -> None:
    with torch.no_grad():
        model(tokens, cache=cache, use_cache=True, logits_to_keep=1)
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _record(benchmark, phase: str, impl: str, shape: str, tokens: int, calls: list[tuple[str, str]]) -> None:
    median = benchmark.stats["median"]
    benchmark.extra_info.update(
        op=f"e2e_{phase}",
        shape=shape,
        impl=impl,
        baseline=BASELINE,
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        layers=CONFIG["num_hidden_layers"],
        tokens_per_s=tokens / median,
        ms=median * 1e3,
        backends=sorted({f"{op}:{backend}" for op, backend in calls}),
    )
    # Which code ran: the patched model calls qwen_fast's ops (attention over the pages on decode, over the prompt's
    # own rows on the prefill of an empty cache), the others none.
    if impl == "qwen_fast":
        ran = {op for op, _ in calls}
        attention = "flash_attn_func" if phase == "prefill" else "flash_attn_with_kvcache"
        assert {"fused_topk", "fused_experts", "qk_norm_rope_and_cache", attention} <= ran, ran
    else:
        assert not calls, calls


def _every_case(test):
    """Parametrize `test` over dtype, batch and implementation (ids read dtype-batch-impl)."""
    for name, values in (("dtype", DTYPES), ("batch", BATCHES), ("impl", IMPLS)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@_every_case
def test_prefill(benchmark, impl, batch, dtype):
    model = _model(dtype)
    tokens = torch.randint(CONFIG["vocab_size"], (batch, PROMPT), device=DEVICE)
    with _running(model, impl) as new_cache:
        cache = new_cache(batch)

        def setup():
            if impl == "qwen_fast":
                cache.reset()  # frees the pages; the pools stay allocated
                return (model, tokens, cache), {}
            return (model, tokens, new_cache(batch)), {}

        with qwen_fast.record_backends() as calls:  # warm-up, untimed
            _forward(*setup()[0])
        benchmark.pedantic(_forward, setup=setup, rounds=PREFILL_ROUNDS)
    _record(benchmark, "prefill", impl, f"B={batch} P={PROMPT} {dtype}", batch * PROMPT, calls)


@_every_case
def test_decode(benchmark, impl, batch, dtype):
    model = _model(dtype)
    context = torch.randint(CONFIG["vocab_size"], (batch, CONTEXT), device=DEVICE)
    step = torch.randint(CONFIG["vocab_size"], (batch, 1), device=DEVICE)
    with _running(model, impl) as new_cache:
        cache = new_cache(batch)
        _forward(model, context, cache)  # the context, untimed

        def setup():
            cache.crop(CONTEXT - cache.get_seq_length())  # back to L tokens: the step writes position L
            return (model, step, cache), {}

        with qwen_fast.record_backends() as calls:  # warm-up, untimed
            _forward(*setup()[0])
        benchmark.pedantic(_forward, setup=setup, rounds=DECODE_ROUNDS)
        assert cache.get_seq_length() == CONTEXT + 1
    _record(benchmark, "decode", impl, f"B={batch} L={CONTEXT} {dtype}", batch, calls)
