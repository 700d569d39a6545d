"""fused_experts and the whole MoE block, per backend, against the reference and transformers.

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_moe.py --benchmark-columns=mean,ops

On CUDA: the Qwen3-30B-A3B layer (E = 128, k = 8, H = 2048, I = 768) at T in {1, 8, 64, 512, 4096}, bf16, timing
qwen_fast's triton backend, the reference, transformers' Qwen3MoeExperts with its "eager" and "grouped_mm" experts
implementations, and vLLM's fused_experts when it is installed (random weights, device-synchronised). On CPU reduced
shapes (E = 32, k = 4, H = 256, I = 128, T in {1, 16, 512}), fp32 and bf16, timing the cpu backend. extra_info
records TFLOP/s (6*T*k*H*I: three GEMMs per pair), GB/s on the active experts' weights (each expert that gets a
token reads its w13 and w2 once) and, on CUDA, the peak memory one call allocates above its inputs.

test_fused_experts_quantized puts bf16, fp8 (128 x 128 blocks) and int8 (per channel) experts side by side at a real
layer's shapes, where the active experts' weights are far larger than any cache, so a decode step (T = 1) is bound
by reading them: on CUDA Qwen3-30B-A3B's and Qwen3-235B-A22B's layers on the triton backend, on CPU Qwen3-30B-A3B's
H, I and k with 32 of its 128 experts on the cpu backend, bf16 activations. extra_info adds the format and
bytes_per_token: the weight and scale bytes of the experts the call routes to, per token (at T = 1: k experts);
8-bit experts read half of bf16's, so the bound on their speed-up is 2x. Successive calls cycle through 16
routings over all E experts, so the weights come from memory rather than from a cache.

test_moe_block times the whole routed layer, the unit a model runs: qwen_fast.nn.SparseMoeBlock.from_hf(block)
(router logits, fused_topk, fused_experts on the forced backend), against
transformers' Qwen3MoeSparseMoeBlock (its router + its experts) with the experts implementation transformers picks
by default ("grouped_mm") and with "eager", all on the same weight tensors.
"""

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

import qwen_fast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    EXPERTS, TOPK, HIDDEN, INTER = 128, 8, 2048, 768
    TOKENS, DTYPES, BACKENDS = [1, 8, 64, 512, 4096], ["bfloat16"], ["triton", "torch"]
else:
    EXPERTS, TOPK, HIDDEN, INTER = 32, 4, 256, 128
    TOKENS, DTYPES, BACKENDS = [1, 16, 512], ["float32", "bfloat16"], ["cpu", "torch"]


def _inputs(num_tokens: int, dtype_name: str):
    dtype = getattr(torch, dtype_name)  # parametrized by name: pytest-benchmark's JSON keeps strings, not dtypes
    x = torch.randn(num_tokens, HIDDEN, device=DEVICE).to(dtype)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, device=DEVICE) / HIDDEN**0.5).to(dtype)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, device=DEVICE) / INTER**0.5).to(dtype)
    weights, ids = qwen_fast.reference.topk_routing(torch.randn(num_tokens, EXPERTS, device=DEVICE), TOPK)
    return x, w13, w2, weights, ids


def _time(benchmark, fn, inputs, label: str, op: str = "fused_experts") -> None:
    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    peak = None
    if DEVICE == "cuda":
        run()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    benchmark(run)
    x, w13, w2, _, ids = inputs
    num_pairs = ids.numel()
    active = int(torch.unique(ids).numel())
    weight_bytes = active * (w13[0].numel() + w2[0].numel()) * w13.element_size()
    mean = benchmark.stats["mean"]
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        op=op,
        shape=f"T={x.shape[0]} {str(x.dtype)[6:]}",
        impl=label,
        baseline="transformers.grouped_mm",  # transformers' default experts implementation
        us=mean * 1e6,
        tflop_per_s=6 * num_pairs * HIDDEN * INTER / mean / 1e12,
        weight_gb_per_s=weight_bytes / mean / 1e9,
        peak_bytes=peak,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_experts(benchmark, backend, num_tokens, dtype):
    inputs = _inputs(num_tokens, dtype)
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        _time(benchmark, lambda: qwen_fast.fused_experts(*inputs), inputs, f"qwen_fast.{backend}")
    assert ("fused_experts", backend) in calls and {b for op, b in calls if op == "fused_experts"} == {backend}


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_transformers_experts(benchmark, impl, num_tokens, dtype):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = transformers.Qwen3MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=TOPK
    )
    config._experts_implementation = impl
    inputs = _inputs(num_tokens, dtype)
    with torch.device("meta"):
        experts = Qwen3MoeExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(inputs[1], requires_grad=False)  # the same weights, not a copy
    experts.down_proj = torch.nn.Parameter(inputs[2], requires_grad=False)
    with torch.no_grad():
        x, weights, ids = inputs[0], inputs[3].to(inputs[0].dtype), inputs[4].long()
        _time(benchmark, lambda: experts(x, ids, weights), inputs, f"transformers.{impl}")


@pytest.mark.parametrize("impl", ["qwen_fast", "grouped_mm", "eager"])
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_block(benchmark, impl, num_tokens, dtype):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = transformers.Qwen3MoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=INTER,
        num_experts=EXPERTS,
        num_experts_per_tok=TOPK,
        norm_topk_prob=True,  # as in the real Qwen3-MoE checkpoints
    )
    config._experts_implementation = "grouped_mm" if impl == "qwen_fast" else impl
    x, w13, w2, _, _ = _inputs(num_tokens, dtype)
    gate_weight = (torch.randn(EXPERTS, HIDDEN, device=DEVICE) / HIDDEN**0.5).to(x.dtype)
    with torch.device("meta"):
        block = Qwen3MoeSparseMoeBlock(config)
    for module, name, tensor in [(block.gate, "weight", gate_weight), (block.experts, "gate_up_proj", w13),
                                 (block.experts, "down_proj", w2)]:  # fmt: skip
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))  # the same tensors, not copies
    with torch.no_grad():
        weights, ids = qwen_fast.reference.topk_routing(F.linear(x, gate_weight), TOPK)  # for extra_info's counts
        inputs = (x, w13, w2, weights, ids)
        if impl != "qwen_fast":
            _time(benchmark, lambda: block(x.view(1, num_tokens, HIDDEN)), inputs, f"transformers.{impl}", "moe_block")
            return

        ours = qwen_fast.nn.SparseMoeBlock.from_hf(block)  # the drop-in, on the same parameters
        backend = BACKENDS[0]
        with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
            _time(benchmark, lambda: ours(x.view(1, num_tokens, HIDDEN)), inputs, f"qwen_fast.{backend}", "moe_block")
    assert ("fused_experts", backend) in calls


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vllm_fused_experts(benchmark, num_tokens, dtype):
    """vLLM's fused_experts on the same inputs (w13 [E, 2I, H] gate rows first and w2 [E, H, I] are its layouts)."""
    vllm_moe = pytest.importorskip("vllm.model_executor.layers.fused_moe.fused_moe")
    if DEVICE != "cuda":
        pytest.skip("vLLM's fused_experts runs on CUDA")
    inputs = _inputs(num_tokens, dtype)
    x, w13, w2, weights, ids = inputs
    _time(benchmark, lambda: vllm_moe.fused_experts(x, w13, w2, weights, ids), inputs, "vllm")


if DEVICE == "cuda":
    QUANT_SHAPES = {"Qwen3-30B-A3B": (128, 8, 2048, 768), "Qwen3-235B-A22B": (128, 8, 4096, 1536)}  # E, k, H, I
    QUANT_TOKENS, QUANT_BACKEND = [1, 8, 64, 512], "triton"
else:
    QUANT_SHAPES = {"Qwen3-30B-A3B/E32": (32, 8, 2048, 768)}  # the real layer's k, H and I, 32 of its 128 experts
    QUANT_TOKENS, QUANT_BACKEND = [1, 4, 16], "cpu"
ROUTINGS = 16  # routings cycled through per case (test_fused_experts_quantized)


@functools.cache
def _quant_layer(shape: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(w13, w2, fused_experts' quantization keywords) of the seeded bf16 layer `shape`, in format `fmt` (the bf16
    weights themselves for "bf16"); generated on the device, one expert at a time for the 8-bit formats."""
    num_experts, _, hidden, inter = QUANT_SHAPES[shape]
    generator = torch.Generator(DEVICE).manual_seed(0)

    def weights(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(num_experts, rows, cols, device=DEVICE, dtype=torch.bfloat16, generator=generator)
        return w.mul_(cols**-0.5)

    w13, w2 = weights(2 * inter, hidden), weights(hidden, inter)
    if fmt == "bf16":
        return w13, w2, {}
    quantize = qwen_fast.quantize_fp8 if fmt == "fp8" else qwen_fast.quantize_int8
    (q13, s13), (q2, s2) = (
        [torch.cat(parts) for parts in zip(*(quantize(w[e : e + 1]) for e in range(num_experts)), strict=True)]
        for w in (w13, w2)
    )
    quant = {"w1_scale": s13, "w2_scale": s2}
    quant |= {"use_fp8_w8a8": True, "block_shape": [128, 128]} if fmt == "fp8" else {"use_int8_w8a16": True}
    return q13, q2, quant


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8"])
@pytest.mark.parametrize("num_tokens", QUANT_TOKENS)
@pytest.mark.parametrize("shape", list(QUANT_SHAPES))
def test_fused_experts_quantized(benchmark, shape, num_tokens, fmt):
    w13, w2, quant = _quant_layer(shape, fmt)
    num_experts, topk, hidden, _ = QUANT_SHAPES[shape]
    generator = torch.Generator(DEVICE).manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, device=DEVICE, generator=generator).bfloat16()
    # Each call routes to other experts (a cycle of ROUTINGS routings over all E): the weights come from memory, as
    # in a model's decode, not from a cache that one fixed routing would keep them in.
    logits = torch.randn(ROUTINGS, num_tokens, num_experts, device=DEVICE, generator=generator)
    routings = [qwen_fast.reference.topk_routing(row, topk) for row in logits]
    calls = itertools.cycle(routings)

    def run():
        weights, ids = next(calls)
        return qwen_fast.fused_experts(x, w13, w2, weights, ids, **quant)

    with qwen_fast.use_backend(QUANT_BACKEND), qwen_fast.record_backends() as trace:
        _time(benchmark, run, (x, w13, w2, *routings[0]), f"qwen_fast.{QUANT_BACKEND}")
    assert trace and {b for _, b in trace} == {QUANT_BACKEND}
    scales = [quant[name] for name in ("w1_scale", "w2_scale") if name in quant]
    per_expert = sum(t[0].nbytes for t in (w13, w2, *scales))
    active = sum(int(torch.unique(ids).numel()) for _, ids in routings) / ROUTINGS
    benchmark.extra_info.update(
        shape=f"{shape} T={num_tokens} bfloat16",
        format=fmt,
        baseline="qwen_fast.bf16",
        bytes_per_token=active * per_expert / num_tokens,
        weight_gb_per_s=active * per_expert / benchmark.stats["mean"] / 1e9,
    )
