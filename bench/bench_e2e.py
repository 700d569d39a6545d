"""End to end: the prefill of a whole Qwen3-MoE model (random weights), patched by qwen_fast against transformers
unpatched, on the same weights. The decode step is bench/bench_step.py's, on the same models (it imports DEVICE,
CONFIG, DTYPES, BATCHES, random_model, forward and record from here).

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_e2e.py --benchmark-columns=median,ops

Timed, model forwards under torch.no_grad() returning the last position's logits (as generate asks),
device-synchronised:
  test_prefill: B prompts of P tokens into an empty cache (the cache is emptied before each round, untimed);
    test_prefill_llama_cpp: llama.cpp's row, batch 1;
  test_decode: batch 1, DECODE_STEPS greedy tokens after a prompt of DECODE_PROMPT tokens (the prefill is untimed),
    tokens_per_s = DECODE_STEPS / the median; greedy_agreement: the fraction of the generated tokens that equal
    unpatched transformers' (DynamicCache, eager) in the same dtype, up to the first difference. Weights: each
    dtype, and the bf16 model (CUDA) or the last CPU dtype with its experts quantized by qwen_fast.quantize_experts
    to int8 or fp8 ("bfloat16+int8": qwen_fast, and llama.cpp's Q8_0 of the same bf16 model, whose every matrix
    is 8-bit; transformers has no 8-bit CPU experts).
Implementations:
  "qwen_fast": qwen_fast.patch(model) (qwen_fast.nn.SparseMoeBlock and GQAAttention, the ops' `auto` backends) with a
    qwen_fast.PagedKVCache.for_model(model, max_batch=B);
  "transformers.grouped_mm" (transformers' default experts implementation: the baseline) and "transformers.eager",
    unpatched, with transformers' DynamicCache and its default attention (sdpa);
  "llama.cpp" (CPU, batch 1): the same weights converted by llama.cpp's converter to GGUF F32 (float32) or BF16
    (bfloat16), run by llama-cpp-python on as many threads as torch (bench/llama_cpp_model.py says what it needs;
    the rows skip without it).
Shapes: on CUDA the Qwen3-30B-A3B decoder layer (hidden 2048, 128 experts top-8, moe_intermediate 768, 32 / 4 heads of
128, vocab 151936) with 2 layers, bf16, B in {1, 32}, P = 512. On CPU the small Qwen3-MoE shipped as
qwen_fast/configs/models/qwen3_moe_small.json (quarter width, 64 experts top-8, 4 layers), fp32 and bf16, B in
{1, 8}, P = 128.

extra_info: op ("e2e_prefill"), shape, impl, baseline (the qwen-fast bench convention), device, tokens_per_s (B * P
per prefill) and ms (the median), and for qwen_fast the backends its ops ran.
"""

import contextlib
import copy
import functools

import llama_cpp_model
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
    DTYPES, BATCHES, PROMPT, PREFILL_ROUNDS = ["bfloat16"], [1, 32], 512, 20
else:
    CONFIG = config_kwargs()
    DTYPES, BATCHES, PROMPT, PREFILL_ROUNDS = ["float32", "bfloat16"], [1, 8], 128, 5
IMPLS = ["qwen_fast", "transformers.grouped_mm", "transformers.eager"]
BASELINE = "transformers.grouped_mm"
LLAMA_CPP = "llama.cpp"
DECODE_PROMPT, DECODE_STEPS, DECODE_ROUNDS = 16, 64, 5
DECODE_WEIGHTS = [*DTYPES, *(f"{DTYPES[-1]}+{experts}" for experts in ("int8", "fp8"))]  # + 8-bit experts


@functools.cache
def random_model(dtype_name: str) -> torch.nn.Module:
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


def forward(step, tokens: torch.Tensor, cache) -> torch.Tensor:
    """`step` (the model, or a compiled model) on `tokens` [B, S] appended to `cache`, under torch.no_grad(),
    device-synchronised: the last position's logits [B, 1, vocab]."""
    with torch.no_grad():
        logits = step(tokens, cache=cache, use_cache=True, logits_to_keep=1).logits
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return logits


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def record(benchmark, op: str, shape: str, impl: str, baseline: str, tokens: int, calls, attention: str) -> None:
    """The qwen-fast bench convention (op, shape, impl, baseline) plus device, layers, tokens_per_s (`tokens` per
    median), ms and the qwen_fast backends that ran (`calls`, from qwen_fast.record_backends()). Checks which code
    ran: an impl named qwen_fast* calls qwen_fast's routing, experts, fused norm/RoPE/cache write and `attention` ops,
    the others none."""
    median = benchmark.stats["median"]
    benchmark.extra_info.update(
        op=op,
        shape=shape,
        impl=impl,
        baseline=baseline,
        device=device_name(),
        layers=CONFIG["num_hidden_layers"],
        tokens_per_s=tokens / median,
        ms=median * 1e3,
        backends=sorted({f"{name}:{backend}" for name, backend in calls}),
    )
    if impl.startswith("qwen_fast"):
        ran = {name for name, _ in calls}
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
    model = random_model(dtype)
    tokens = torch.randint(CONFIG["vocab_size"], (batch, PROMPT), device=DEVICE)
    with _running(model, impl) as new_cache:
        cache = new_cache(batch)

        def setup():
            if impl == "qwen_fast":
                cache.reset()  # frees the pages; the pools stay allocated
                return (model, tokens, cache), {}
            return (model, tokens, new_cache(batch)), {}

        with qwen_fast.record_backends() as calls:  # warm-up, untimed
            forward(*setup()[0])
        benchmark.pedantic(forward, setup=setup, rounds=PREFILL_ROUNDS)
    shape = f"B={batch} P={PROMPT} {dtype}"
    record(benchmark, "e2e_prefill", shape, impl, BASELINE, batch * PROMPT, calls, "flash_attn_func")


def _llama_cpp_runner(weights: str):
    """A llama.cpp Runner on the random model with `weights` (a dtype, or DECODE_WEIGHTS' 8-bit entries: llama.cpp's
    Q8_0 of the bf16 model for int8 experts), batch 1; or a skip saying why not (CPU only, installed, a format
    llama.cpp has)."""
    if DEVICE != "cpu":
        pytest.skip("llama.cpp rows: CPU only")
    if reason := llama_cpp_model.missing():
        pytest.skip(reason)
    dtype, _, experts = weights.partition("+")
    if experts not in ("", "int8"):
        pytest.skip(f"llama.cpp has no CPU format for {experts} weights")
    file_type = "q8_0" if experts else dtype
    path = llama_cpp_model.gguf_file(random_model(dtype), file_type)
    return llama_cpp_model.Runner(
        path, file_type, torch.get_num_threads(), context=max(PROMPT, DECODE_PROMPT + DECODE_STEPS)
    )


@functools.cache
def _decode_model(weights: str) -> torch.nn.Module:
    """The random model with `weights`: a dtype, or "<dtype>+<format>", a copy with its experts quantized by
    qwen_fast.quantize_experts."""
    dtype, _, experts = weights.partition("+")
    if not experts:
        return random_model(dtype)
    model = copy.deepcopy(random_model(dtype))
    qwen_fast.quantize_experts(model, experts)
    return model


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_llama_cpp(benchmark, dtype):
    runner = _llama_cpp_runner(dtype)
    tokens = torch.randint(CONFIG["vocab_size"], (PROMPT,)).tolist()
    runner.prefill(tokens)  # warm-up, untimed
    benchmark.pedantic(runner.prefill, args=(tokens,), rounds=PREFILL_ROUNDS)
    record(benchmark, "e2e_prefill", f"B=1 P={PROMPT} {dtype}", LLAMA_CPP, BASELINE, PROMPT, [], "")


def _greedy(step, token: torch.Tensor, cache, steps: int) -> list[int]:
    """`steps` greedy decode steps of `step` from `token` [1, 1] (appended to `cache` first): the tokens generated."""
    generated = []
    for _ in range(steps):
        token = forward(step, token, cache)[:, -1].argmax(-1, keepdim=True)
        generated.append(int(token))
    return generated


@functools.cache
def _decode_prompt() -> torch.Tensor:
    return torch.randint(CONFIG["vocab_size"], (1, DECODE_PROMPT), generator=torch.Generator().manual_seed(1))


@functools.cache
def _transformers_tokens(dtype: str) -> tuple[int, ...]:
    """Unpatched transformers' greedy tokens (eager experts, DynamicCache) after the decode prompt."""
    model = random_model(dtype)
    with _running(model, "transformers.eager") as new_cache:
        cache = new_cache(1)
        first = forward(model, _decode_prompt().to(DEVICE), cache)[:, -1].argmax(-1, keepdim=True)
        return tuple(_greedy(model, first, cache, DECODE_STEPS))


def _agreement(tokens: list[int], expected: tuple[int, ...]) -> float:
    """The fraction of `expected` that `tokens` reproduce before their first difference."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, expected, strict=True)) if a != b), len(expected))
    return same / len(expected)


@pytest.mark.parametrize("impl", [*IMPLS, LLAMA_CPP])
@pytest.mark.parametrize("weights", DECODE_WEIGHTS)
def test_decode(benchmark, impl, weights):
    prompt = _decode_prompt()
    dtype, _, experts = weights.partition("+")
    if experts and impl.startswith("transformers"):
        pytest.skip("transformers has no CPU kernel for 8-bit experts (it dequantizes FP8 checkpoints at load)")
    calls = []
    if impl == LLAMA_CPP:
        runner = _llama_cpp_runner(weights)
        first = runner.prefill(prompt[0].tolist())
        runner.decode(first, 4)  # warm-up, untimed
        tokens = benchmark.pedantic(
            runner.decode, setup=lambda: ((runner.prefill(prompt[0].tolist()), DECODE_STEPS), {}), rounds=DECODE_ROUNDS
        )
    else:
        model = _decode_model(weights)
        prompt = prompt.to(DEVICE)
        with _running(model, impl) as new_cache:
            cache = new_cache(1)

            def setup():
                step_cache = cache if impl == "qwen_fast" else new_cache(1)
                if impl == "qwen_fast":
                    cache.reset()
                first = forward(model, prompt, step_cache)[:, -1].argmax(-1, keepdim=True)
                return (model, first, step_cache, DECODE_STEPS), {}

            with qwen_fast.record_backends() as calls:  # warm-up, untimed
                _greedy(*setup()[0][:3], 4)
            tokens = benchmark.pedantic(_greedy, setup=setup, rounds=DECODE_ROUNDS)
    record(benchmark, "e2e_decode", f"B=1 P={DECODE_PROMPT} +{DECODE_STEPS} {weights}", impl, BASELINE, DECODE_STEPS,
           calls, "flash_attn_with_kvcache")  # fmt: skip
    benchmark.extra_info["greedy_agreement"] = _agreement(tokens, _transformers_tokens(dtype))
