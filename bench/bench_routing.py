"""fused_topk: the router's top-k from logits, per backend, against transformers' routers and vLLM's fused_topk.

    pip install --no-build-isolation '.[bench]' && pytest bench/bench_routing.py --benchmark-columns=mean,ops

Two routings at T in {1, 8, 64, 512, 4096} tokens: Qwen3-30B-A3B (E = 128, k = 8, softmax, renormalize, bf16
logits) and DeepSeek-V3 (E = 256, k = 8, sigmoid + e_score_correction_bias, 8 groups of which 4 are kept, x 2.5,
fp32 logits as transformers computes them). Backends: cpu and torch on CPU; cuda, triton and torch on CUDA
(device-synchronised). Peers, from the same logits: transformers' Qwen3MoeTopKRouter / DeepseekV3TopkRouter forward
with its F.linear replaced by the identity (so only the softmax / sigmoid + top-k part runs: the router GEMM is not
routing), and vLLM's fused_topk / grouped_topk when vLLM is importable. extra_info: us per call, GB/s on the logits
read plus the fp32 weights and int32 ids written, the device name.
"""

import types
from unittest import mock

import pytest
import torch

import qwen_fast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["cuda", "triton", "torch"] if DEVICE == "cuda" else ["cpu", "torch"]
TOKENS = [1, 8, 64, 512, 4096]
TOPK = 8
# name: (E, logits dtype, fused_topk arguments after topk)
ROUTINGS = {
    "qwen3-30b-a3b": (128, torch.bfloat16, {"renormalize": True}),
    "deepseek-v3": (256, torch.float32, {"renormalize": True, "scoring_func": "sigmoid", "num_expert_group": 8,
                                         "topk_group": 4, "routed_scaling_factor": 2.5}),
}  # fmt: skip


def _inputs(routing: str, num_tokens: int):
    num_experts, dtype, kwargs = ROUTINGS[routing]
    logits = torch.randn(num_tokens, num_experts, device=DEVICE).to(dtype)
    kwargs = dict(kwargs)
    if "num_expert_group" in kwargs:
        kwargs["e_score_correction_bias"] = torch.randn(num_experts, device=DEVICE) / 16
    return logits, kwargs


def _time(benchmark, fn, logits: torch.Tensor, label: str, routing: str) -> None:
    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(run)
    num_tokens = logits.shape[0]
    moved = logits.numel() * logits.element_size() + num_tokens * TOPK * (4 + 4)
    mean = benchmark.stats["mean"]
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        op="fused_topk",
        shape=f"{routing} T={num_tokens}",
        impl=label,
        baseline="transformers.router",  # the model's own router (its softmax/sigmoid + top-k part)
        us=mean * 1e6,
        gb_per_s=moved / mean / 1e9,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_fused_topk(benchmark, backend, num_tokens, routing):
    logits, kwargs = _inputs(routing, num_tokens)
    renormalize = kwargs.pop("renormalize")
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        hidden = logits.new_empty(logits.shape[0], 1)  # vLLM's signature: only its T is read
        _time(benchmark, lambda: qwen_fast.fused_topk(hidden, logits, TOPK, renormalize, **kwargs), logits,
              f"qwen_fast.{backend}", routing)  # fmt: skip
    assert calls and {b for _, b in calls} == {backend}


def _transformers_router(routing: str):
    """(router module, its modeling module) with hidden_size = E, so that the logits are its input."""
    num_experts = ROUTINGS[routing][0]
    if routing == "qwen3-30b-a3b":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe import modeling_qwen3_moe as modeling

        config = Qwen3MoeConfig(hidden_size=num_experts, num_experts=num_experts, num_experts_per_tok=TOPK,
                                norm_topk_prob=True)  # fmt: skip
        return modeling.Qwen3MoeTopKRouter(config), modeling
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as modeling

    config = DeepseekV3Config(hidden_size=num_experts, n_routed_experts=num_experts, n_group=8, topk_group=4,
                              num_experts_per_tok=TOPK, routed_scaling_factor=2.5, norm_topk_prob=True)  # fmt: skip
    return modeling.DeepseekV3TopkRouter(config), modeling


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_transformers_router(benchmark, num_tokens, routing):
    pytest.importorskip("transformers")
    logits, kwargs = _inputs(routing, num_tokens)
    router, modeling = _transformers_router(routing)
    router.to(DEVICE)
    if "e_score_correction_bias" in kwargs:
        router.e_score_correction_bias = kwargs["e_score_correction_bias"]
    identity = types.SimpleNamespace(linear=lambda x, weight: x)  # the logits are the input: no router GEMM
    with mock.patch.object(modeling, "F", identity), torch.no_grad():
        assert torch.equal(router(logits)[0], logits.float() if routing == "deepseek-v3" else logits)
        _time(benchmark, lambda: router(logits), logits, "transformers.router", routing)


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_vllm_fused_topk(benchmark, num_tokens, routing):
    fused_moe = pytest.importorskip("vllm.model_executor.layers.fused_moe.fused_moe")
    logits, kwargs = _inputs(routing, num_tokens)
    hidden = torch.empty(num_tokens, 1, device=DEVICE, dtype=logits.dtype)  # vLLM reads only its shape
    if routing == "qwen3-30b-a3b":
        fn = lambda: fused_moe.fused_topk(hidden, logits, TOPK, True)  # noqa: E731
    else:
        fn = lambda: fused_moe.grouped_topk(  # noqa: E731
            hidden, logits, TOPK, True, 8, 4, scoring_func="sigmoid", routed_scaling_factor=2.5,
            e_score_correction_bias=kwargs["e_score_correction_bias"],
        )  # fmt: skip
    _time(benchmark, fn, logits, "vllm", routing)
