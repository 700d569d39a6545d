"""Continuous batching throughput: transformers' `generate_batch` serving a mixed set of requests on bench_e2e.py's
random Qwen3-MoE, with transformers' own attention against qwen_fast's, side by side in one run.

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_batching.py --benchmark-columns=median,ops

Timed: REQUESTS requests whose prompt and output lengths are drawn (seeded) from PROMPTS and OUTPUTS tokens, all
added at once to transformers' continuous-batching manager (each with its own max_new_tokens, greedy, no EOS) under
its default config with a cache of exactly the pages the requests need (its default sizing zero-fills gigabytes on
every start), until the last one finishes; the manager is started and stopped inside, as generate_batch does.
tokens_per_s counts generated tokens only. Implementations, on the same weights:
  "transformers.sdpa" (the baseline): transformers' continuous batching as it runs without a flash-attn package, sdpa
    attention over the keys its cache gathers, grouped_mm experts;
  "qwen_fast.registered": attn_implementation and experts_implementation "qwen_fast" (qwen_fast.register_transformers):
    the varlen kernel over the keys the cache gathers, qwen_fast's experts;
  "qwen_fast.patch": qwen_fast.patch(model): GQAAttention writes the batching cache's pages with the fused q/k-norm +
    RoPE + write and attends over them in place at decode (flash_attn_with_kvcache), the fused router and experts.
Every implementation must reproduce the baseline's tokens for at least 3 requests in 4 (fp32 random weights have
near-ties: greedy_agreement in extra_info is the fraction of requests whose tokens are all equal), or the bench raises.

Shapes: bench_e2e.py's models (CPU: the small Qwen3-MoE in fp32; CUDA: 2 layers of Qwen3-30B-A3B in bf16). On CPU
torch runs OMP_NUM_THREADS threads, 2 when unset.

extra_info: bench_e2e.record's (op "e2e_batching", shape, impl, baseline, device, layers, tokens_per_s, ms,
backends), plus requests, generated_tokens and greedy_agreement.
"""

import functools
import os

import pytest
import torch
from bench_e2e import CONFIG, DEVICE, device_name, random_model
from transformers.generation.continuous_batching.utils import WorkloadHints

import qwen_fast

transformers = pytest.importorskip("transformers")

REQUESTS, PROMPTS, OUTPUTS, ROUNDS = (32, (16, 256), (16, 128), 3) if DEVICE == "cuda" else (32, (8, 64), (8, 32), 3)
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
PAGE_SIZE = 256  # transformers' default
IMPLS = ["transformers.sdpa", "qwen_fast.registered", "qwen_fast.patch"]
BASELINE = "transformers.sdpa"

if DEVICE == "cpu":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@functools.cache
def requests() -> tuple[list[list[int]], list[int]]:
    """The seeded requests: prompts (token ids) and how many tokens each generates."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(PROMPTS[0], PROMPTS[1] + 1, (REQUESTS,), generator=generator).tolist()
    outputs = torch.randint(OUTPUTS[0], OUTPUTS[1] + 1, (REQUESTS,), generator=generator).tolist()
    prompts = [torch.randint(CONFIG["vocab_size"], (n,), generator=generator).tolist() for n in lengths]
    return prompts, outputs


def serve(model) -> list[list[int]]:
    """The requests through transformers' continuous-batching manager, each with its own output length: the
    generated tokens, in request order."""
    prompts, outputs = requests()
    config = transformers.GenerationConfig(
        max_new_tokens=max(outputs), do_sample=False, eos_token_id=None, pad_token_id=0
    )
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(outputs),
                          num_requests=len(prompts))  # fmt: skip
    # a cache for exactly this workload: transformers' default sizing zero-fills gigabytes on CPU, on every start
    pages = REQUESTS * -(-(PROMPTS[1] + OUTPUTS[1]) // PAGE_SIZE)
    batching = transformers.ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=pages)
    with model.continuous_batching_context_manager(
        generation_config=config, block=True, timeout=60, workload_hints=hints, continuous_batching_config=batching
    ) as manager:
        ids = [manager.add_request(p, max_new_tokens=n) for p, n in zip(prompts, outputs, strict=True)]
        done = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous-batching manager stopped before finishing the requests")
            if result is not None and result.is_finished():
                done[result.request_id] = result.generated_tokens
    return [done[i] for i in ids]


@functools.cache
def baseline_tokens() -> list[list[int]]:
    model = random_model(DTYPE)
    return serve(model)


@pytest.mark.parametrize("impl", IMPLS)
def test_batching(benchmark, impl):
    model = random_model(DTYPE)
    expected = baseline_tokens()
    handle = None
    if impl == "qwen_fast.registered":
        name = qwen_fast.register_transformers()
        model.set_attn_implementation(name)
        model.set_experts_implementation(name)
    elif impl == "qwen_fast.patch":
        handle = qwen_fast.patch(model)
    try:
        with qwen_fast.record_backends() as calls:  # warm-up, untimed: also the tokens checked
            tokens = serve(model)
        benchmark.pedantic(serve, args=(model,), rounds=ROUNDS)
    finally:
        if handle is not None:
            handle.undo()
        model.set_attn_implementation("sdpa")
        model.set_experts_implementation("grouped_mm")
    agreement = sum(a == b for a, b in zip(tokens, expected, strict=True)) / REQUESTS
    assert agreement >= 0.75, f"{impl}: only {agreement:.0%} of the requests reproduce the baseline's tokens"
    generated = sum(len(t) for t in tokens)
    median = benchmark.stats["median"]
    benchmark.extra_info.update(
        op="e2e_batching", shape=f"{REQUESTS} requests, prompts {PROMPTS}, outputs {OUTPUTS}, {DTYPE}", impl=impl,
        baseline=BASELINE, device=device_name(), layers=CONFIG["num_hidden_layers"], tokens_per_s=generated / median,
        ms=median * 1e3, backends=sorted({f"{op}:{backend}" for op, backend in calls}), requests=REQUESTS,
        generated_tokens=generated, greedy_agreement=agreement,
    )  # fmt: skip
    ran = {op for op, _ in calls}
    if impl == BASELINE:
        assert not ran, ran
    else:
        assert {"fused_experts", "flash_attn_varlen_func"} <= ran, ran
