"""fused_experts and the whole MoE block, per backend, against the reference and transformers.

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_moe.py --benchmark-columns=mean,ops

On CUDA: the Qwen3-30B-A3B layer (E = 128, k = 8, H = 2048, I = 768) at T in {1, 8, 64, 512, 4096}, bf16, timing
qwen_fast's triton backend, the reference, transformers' Qwen3MoeExperts with its "eager" and "grouped_mm" experts
implementations, and vLLM's fused_experts when it is installed (random weights, device-synchronised). On CPU reduced
shapes (E = 32, k = 4, H = 256, I = 128, T in {1, 16, 512}), fp32 and bf16, timing the cpu backend. extra_info
records TFLOP/s (6*T*k*H*I: three GEMMs per pair), GB/s on the active experts' weights (each expert that gets a
token reads its w13 and w2 once) and, on CUDA, the peak memory one call allocates above its inputs.

test_moe_block times the whole routed layer, the unit a model runs: qwen_fast.nn.SparseMoeBlock.from_hf(block)
(router logits, fused_topk, fused_experts on the forced backend), against
transformers' Qwen3MoeSparseMoeBlock (its router + its experts) with the experts implementation transformers picks
by default ("grouped_mm") and with "eager", all on the same weight tensors.
"""

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
