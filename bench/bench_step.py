"""The decode step of a whole Qwen3-MoE model (bench_e2e.py's random models), qwen_fast eager and compiled against
transformers' default and its strongest setup (StaticCache + torch.compile), side by side, and each as a fraction of
the machine's memory-bandwidth bound.

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_step.py --benchmark-columns=median,ops

Timed: one new token per sequence (B of them) after a context of L tokens held in the cache, a single forward under
torch.no_grad() returning the last position's logits, device-synchronised; the step writes position L and attends over
L + 1 keys. Before each round the cache is cropped back to L tokens (untimed), so rounds do not grow it; L is a
multiple of the paged cache's block size 16, so the step pays a page allocation, which 1 decode step in 16 does. The
context is written by an eager prefill, untimed. Both caches are sized for L + 64 tokens (a 64-token generation).
Implementations, on the same weights:
  "qwen_fast.eager": qwen_fast.patch(model) with a qwen_fast.PagedKVCache.for_model(model, max_batch=B, block_size=16);
  "qwen_fast.compiled": the same model and cache, the step through torch.compile(model, ...);
  "transformers.grouped_mm": unpatched, transformers' defaults (grouped_mm experts, sdpa attention, DynamicCache);
  "transformers.static_compiled" (the baseline, the strongest transformers setup): unpatched, a StaticCache and the
    step through torch.compile(model, ...), as generate(cache_implementation="static", compile_config=...) runs it.
Both compiled steps use transformers.CompileConfig()'s torch.compile options (inductor, mode "reduce-overhead":
CUDA graphs where CUDA runs) and are warmed up until a step compiles nothing (dynamo's unique_graphs stops growing);
a recompile while timing raises. Every implementation must produce the greedy next tokens of an eager transformers
step (DynamicCache, unpatched) on at least half the batch's rows in one of its warm-up steps, or the bench raises
(greedy_agreement in extra_info: the fraction of rows that agree; bf16 near-ties flip a row now and then).

test_decode_step_quantized times "qwen_fast.eager" on the same model with its experts quantized in place
(qwen_fast.quantize_experts on a copy: "fp8", 128 x 128 blocks, or "int8", per channel), beside test_decode_step's
"qwen_fast.eager" (the model dtype's experts, its baseline). Its reference step is the quantized model's own, on the
torch backend (the specification the kernels match); weight_bytes count the 8-bit experts and their scales.

The memory-bandwidth bound: the bytes one step must read at least, over the machine's copy bandwidth (COPY_BYTES
copied COPY_ROUNDS times over about a second, best time, GB/s = 2 * bytes / time: read and write). Bytes: every
parameter once (norms, attention projections, q/k norms, routers, LM head), except the embedding (only the rows of the
step's distinct tokens) and the experts (per layer only the distinct experts the step routed to, counted on the
reference step: at most k at B = 1, at most B * k), plus the K and V of L + 1 positions per sequence and layer; in
the model dtype.

Shapes: those of bench_e2e.py (CPU: the small Qwen3-MoE, fp32 and bf16, B in {1, 8}, L = 256; CUDA: 2 layers of
Qwen3-30B-A3B, bf16, B in {1, 32}, L = 2048). On CPU torch runs OMP_NUM_THREADS threads, 2 when unset, in every
implementation (pin the process to as many cores: `OMP_NUM_THREADS=2 taskset -c 0,1`). On a machine whose cores other
processes share, fewer threads than cores measure steadier: a parallel region waits for its slowest thread.

extra_info: bench_e2e.record's (op "decode_step", shape, impl, baseline, device, layers, tokens_per_s, ms, backends),
plus weight_bytes, kv_bytes, experts_touched (per layer), copy_GBps, bound_ms, fraction_of_bound (bound_ms / ms) and
fraction_of_bound_best (bound_ms / the fastest round: on a shared machine the closer to an unloaded one),
compiled graphs (compiled impls) and qwen_fast_calls_per_layer (qwen_fast impls: Python calls into the qwen_fast
package over one whole step, sys.setprofile, divided by the number of layers).
"""

import contextlib
import copy
import dataclasses
import functools
import os
import re
import sys
import time

import pytest
import torch
import torch._dynamo.utils
from bench_e2e import BATCHES, CONFIG, DEVICE, DTYPES, device_name, forward, random_model, record

import qwen_fast

transformers = pytest.importorskip("transformers")

CONTEXT, ROUNDS = (2048, 50) if DEVICE == "cuda" else (256, 30)
MAX_LEN = CONTEXT + 64
CPU_THREADS = int(os.environ.get("OMP_NUM_THREADS", "2"))
IMPLS = ["transformers.grouped_mm", "transformers.static_compiled", "qwen_fast.eager", "qwen_fast.compiled"]
BASELINE = "transformers.static_compiled"
WARMUP_LIMIT = 6  # steps: a compiled step still compiling after this many is an error
COPY_BYTES, COPY_ROUNDS, COPY_PAUSE = 512 << 20, 10, 0.05  # the rounds spread over ~1 s: other processes come and go

if DEVICE == "cpu":
    torch.set_num_threads(CPU_THREADS)


@dataclasses.dataclass(frozen=True)
class Reference:
    """One eager transformers step (unpatched, DynamicCache) and what it read."""

    context: torch.Tensor  # [B, L] token ids
    step: torch.Tensor  # [B, 1] the step's token ids
    greedy: torch.Tensor  # [B] the step's greedy next tokens
    experts: tuple[int, ...]  # distinct experts routed to, per layer
    weight_bytes: int
    kv_bytes: int


@functools.cache
def _model(dtype: str, experts: str) -> torch.nn.Module:
    """random_model(dtype), or (experts "fp8" / "int8") a copy with its experts quantized in place."""
    if experts == "model":
        return random_model(dtype)
    model = copy.deepcopy(random_model(dtype))
    qwen_fast.quantize_experts(model, experts)
    return model


@functools.cache
def _reference(dtype: str, batch: int, experts: str = "model") -> Reference:
    """The step of `_model(dtype, experts)` in eager transformers (DynamicCache, unpatched); for quantized experts the
    experts modules are qwen_fast's, run on the torch backend (the reference)."""
    model = _model(dtype, experts)
    backend = qwen_fast.use_backend("torch") if experts != "model" else contextlib.nullcontext()
    with backend:
        return _reference_step(model, batch)


def _reference_step(model: torch.nn.Module, batch: int) -> Reference:
    generator = torch.Generator().manual_seed(batch)
    context, step = (torch.randint(CONFIG["vocab_size"], (batch, n), generator=generator) for n in (CONTEXT, 1))
    context, step = context.to(DEVICE), step.to(DEVICE)
    cache = transformers.DynamicCache(config=model.config)
    forward(model, context, cache)
    routed: dict[int, int] = {}

    def count_experts(index):  # the router returns (logits, weights, indices [T, k])
        return lambda module, args, output: routed.__setitem__(index, output[2].unique().numel())

    hooks = [layer.mlp.gate.register_forward_hook(count_experts(i)) for i, layer in enumerate(model.model.layers)]
    try:
        greedy = forward(model, step, cache)[:, -1].argmax(-1)
    finally:
        for hook in hooks:
            hook.remove()
    experts = tuple(routed[i] for i in range(len(model.model.layers)))
    return Reference(context, step, greedy, experts, _weight_bytes(model, step, experts), _kv_bytes(model, batch))


def _weight_bytes(model: torch.nn.Module, step: torch.Tensor, experts: tuple[int, ...]) -> int:
    """Bytes of parameters a step on `step`'s tokens must read: see the module docstring."""
    total = 0
    for name, param in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            total += step.unique().numel() * param[0].nbytes
        elif match := re.search(r"layers\.(\d+)\.mlp\.experts\.", name):
            total += experts[int(match.group(1))] * param[0].nbytes
        else:
            total += param.nbytes
    return total


def _kv_bytes(model: torch.nn.Module, batch: int) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head_dim * model.dtype.itemsize  # K and V
    return config.num_hidden_layers * batch * (CONTEXT + 1) * per_token


@functools.cache
def _copy_bandwidth() -> float:
    """The device's copy bandwidth in bytes/s: best of COPY_ROUNDS copies of COPY_BYTES (COPY_PAUSE s apart), read +
    write."""
    source = torch.ones(COPY_BYTES // 4, device=DEVICE)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(COPY_ROUNDS + 1):  # the first touches the target's pages
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        time.sleep(COPY_PAUSE)
    return 2 * source.nbytes / best


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _compiled(model: torch.nn.Module):
    return torch.compile(model, **transformers.CompileConfig().to_dict())


@contextlib.contextmanager
def _variant(model: torch.nn.Module, impl: str, batch: int):
    """Yields (step, cache): the callable that runs a step as `impl`, and an empty cache of its kind."""
    torch._dynamo.reset()  # every compiled impl compiles afresh: no graph of another case is reused
    try:
        if impl.startswith("qwen_fast"):
            with qwen_fast.patch(model):
                cache = qwen_fast.PagedKVCache.for_model(model, max_batch=batch, block_size=16, max_seq_len=MAX_LEN)
                yield (_compiled(model) if impl == "qwen_fast.compiled" else model), cache
        elif impl == "transformers.static_compiled":
            yield _compiled(model), transformers.StaticCache(config=model.config, max_cache_len=MAX_LEN)
        else:
            yield model, transformers.DynamicCache(config=model.config)
    finally:
        torch._dynamo.reset()


def _qwen_fast_calls(run) -> int:
    """Python calls into the qwen_fast package (its kernels subpackage included) while `run()` runs."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_globals.get("__name__", "").startswith("qwen_fast"):
            calls += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step(benchmark, impl, batch, dtype):
    _bench_step(benchmark, random_model(dtype), _reference(dtype, batch), impl, batch, dtype, impl, BASELINE)


@pytest.mark.parametrize("experts", ["fp8", "int8"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step_quantized(benchmark, experts, batch, dtype):
    model, reference = _model(dtype, experts), _reference(dtype, batch, experts)
    _bench_step(benchmark, model, reference, "qwen_fast.eager", batch, dtype, f"qwen_fast.eager.{experts}",
                "qwen_fast.eager")  # fmt: skip
    benchmark.extra_info["experts"] = experts


def _bench_step(benchmark, model, reference: Reference, impl: str, batch: int, dtype: str, label: str, baseline: str):
    """Times `impl` on `model`'s decode step against `reference`, recorded as `label` (see the module docstring)."""
    with _variant(model, impl, batch) as (step, cache):
        forward(model, reference.context, cache)  # the context: an eager prefill, untimed

        def setup():
            cache.crop(CONTEXT - int(cache.get_seq_length()))  # back to L tokens: the step writes position L
            return (step, reference.step, cache), {}

        # The backends: an eager step of the same model (record_backends inside a compiled step would make dynamo
        # guard on its list and recompile).
        with qwen_fast.record_backends() as calls:
            forward(model, *setup()[0][1:])
        greedy, graphs, first = [], None, _graphs()
        for _ in range(WARMUP_LIMIT):  # warm-up, untimed: until a step compiles nothing
            before = _graphs()
            greedy.append((forward(*setup()[0])[:, -1].argmax(-1) == reference.greedy).float().mean().item())
            if _graphs() == before and len(greedy) > 1:
                graphs = before
                break
        if graphs is None:
            raise RuntimeError(f"{impl} still compiles after {WARMUP_LIMIT} warm-up steps ({_graphs()} graphs)")
        if max(greedy) < 0.5:  # bf16 near-ties may flip a row (transformers' own compiled step flips 1 in 8)
            raise RuntimeError(
                f"{impl} agreed with the eager reference's greedy tokens {reference.greedy.tolist()} on at most "
                f"{max(greedy):.0%} of the rows in its warm-up steps"
            )
        benchmark.pedantic(forward, setup=setup, rounds=ROUNDS)
        if _graphs() != graphs:
            raise RuntimeError(f"{impl} recompiled while timed: {graphs} graphs after warm-up, {_graphs()} after")
        if int(cache.get_seq_length()) != CONTEXT + 1:
            raise RuntimeError(f"{impl}'s cache holds {int(cache.get_seq_length())} tokens, expected {CONTEXT + 1}")
        if impl.startswith("qwen_fast"):
            args = setup()[0]  # the crop is not the step's
            calls_per_step = _qwen_fast_calls(lambda: forward(*args))
            benchmark.extra_info["qwen_fast_calls_per_layer"] = calls_per_step / CONFIG["num_hidden_layers"]
    shape = f"B={batch} L={CONTEXT} {dtype}"
    record(benchmark, "decode_step", shape, label, baseline, batch, calls, "flash_attn_with_kvcache")
    bandwidth = _copy_bandwidth()
    bound = (reference.weight_bytes + reference.kv_bytes) / bandwidth
    benchmark.extra_info.update(
        weight_bytes=reference.weight_bytes,
        kv_bytes=reference.kv_bytes,
        experts_touched=list(reference.experts),
        copy_GBps=bandwidth / 1e9,
        bound_ms=bound * 1e3,
        fraction_of_bound=bound / benchmark.stats["median"],
        fraction_of_bound_best=bound / benchmark.stats["min"],
        device=f"{device_name()}, copy {bandwidth / 1e9:.1f} GB/s",
    )
    benchmark.extra_info["greedy_agreement"] = max(greedy)
    if impl.endswith("compiled"):
        benchmark.extra_info["graphs"] = graphs - first
