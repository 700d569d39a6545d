"""qwen_fast.nn (TopKRouter, MoEExperts, SparseMoeBlock) against transformers' own MoE blocks.

Every HF block is built from a transformers config at tiny sizes with seeded N(0, 1/fan_in) weights (no downloads),
converted with from_hf (which must share its parameters) and run on the same input. Routing ties: torch.topk breaks
them its own way and bf16 logits tie often, so the routing is compared as in test_routing.py (the same selected
scores at every position, different ids only where a score is tied) and the outputs on the tokens routed to the same
experts; in fp32 every token must be routed identically.
"""

import pickle

import pytest
import torch
from numerics import assert_close
from test_routing import assert_same_routing
from transformers import (
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import qwen_fast
from qwen_fast.nn import MoEExperts, SparseMoeBlock, TopKRouter
from qwen_fast.reference import fused_experts, topk_routing

HIDDEN, INTER = 32, 16

FAMILIES = {
    "qwen3_moe": lambda: Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)),
    "qwen2_moe": lambda: Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, shared_expert_intermediate_size=2 * INTER, num_experts=15,
        num_experts_per_tok=4, norm_topk_prob=False)),
    "mixtral": lambda: MixtralSparseMoeBlock(MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=8, num_experts_per_tok=2)),
    "olmoe": lambda: OlmoeSparseMoeBlock(OlmoeConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False)),
    "deepseek_v3": lambda: DeepseekV3MoE(DeepseekV3Config(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=32, n_group=4, topk_group=2,
        num_experts_per_tok=4, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1)),
}  # fmt: skip


def _randomize(module: torch.nn.Module) -> None:
    """Seeded N(0, 1/fan_in) weights: router logits and activations stay O(1)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def _hf_block(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    block = FAMILIES[family]()
    block.experts.config._experts_implementation = "eager"
    _randomize(block)
    block.to(dtype).eval()
    if family == "deepseek_v3":  # transformers keeps the router in fp32 (_keep_in_fp32_modules_strict)
        block.gate.float()
        block.gate.e_score_correction_bias.copy_(0.1 * torch.randn(block.gate.num_experts))
    return block


def _choice(family: str, gate: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """[T, E] fp32 selection scores of the HF router."""
    if family == "deepseek_v3":
        return logits.float().sigmoid() + gate.e_score_correction_bias
    return torch.softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_hf_shares_parameters(family):
    hf = _hf_block(family)
    block = SparseMoeBlock.from_hf(hf)
    hf_state, state = hf.state_dict(), block.state_dict()
    assert sorted(state) == sorted(hf_state)  # the same keys: a patched model's checkpoints load unchanged
    for name, tensor in hf_state.items():
        assert state[name].data_ptr() == tensor.data_ptr(), f"{name} was copied"
    hf_params = dict(hf.named_parameters())
    assert all(p is hf_params[name] for name, p in block.named_parameters())
    assert isinstance(block.gate, type(hf.gate)) and isinstance(block.gate, TopKRouter)
    assert isinstance(block.experts, MoEExperts)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("hf_parity", [True, False], ids=["parity", "fp32-weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_hf_block(family, dtype, hf_parity, device):
    hf = _hf_block(family, dtype).to(device)
    block = SparseMoeBlock.from_hf(hf, hf_parity=hf_parity)
    x = torch.randn(2, 24, HIDDEN, dtype=dtype).to(device)
    with torch.no_grad(), qwen_fast.record_backends() as trace:
        out = block(x)
    assert ("fused_experts", "cpu" if device == "cpu" else "triton") in trace  # auto: the device's kernels
    with torch.no_grad():
        hf_out = hf(x)
        flat = x.view(-1, HIDDEN)
        hf_logits, hf_weights, hf_ids = hf.gate(flat)
        logits, weights, ids = block.gate(flat)
    assert isinstance(hf_out, torch.Tensor) and out.shape == hf_out.shape and out.dtype == hf_out.dtype

    # The router: transformers' logits bit for bit, its weights' dtype under hf_parity, the same top-k up to ties.
    assert torch.equal(logits, hf_logits)
    assert ids.dtype == hf_ids.dtype == torch.int64
    assert weights.dtype == (hf_weights.dtype if hf_parity else torch.float32)
    assert_same_routing(ids, weights, hf_ids, hf_weights, _choice(family, hf.gate, hf_logits))

    # The block, on the tokens routed to the same experts: all of them in fp32.
    same = (ids.sort(-1).values == hf_ids.sort(-1).values).all(-1).view(2, 24)
    assert same.all() if dtype == torch.float32 else same.float().mean() >= 0.75
    assert_close(out[same], hf_out[same])


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "qwen2_moe"])
def test_hf_parity_weights_are_transformers_bits(family):
    """In bf16 with hf_parity, the routing weights are transformers' own (its cast to the model dtype)."""
    hf = _hf_block(family, torch.bfloat16)
    gate = TopKRouter.from_hf(hf.gate, hf_parity=True)
    x = torch.randn(64, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        hf_logits, hf_weights, hf_ids = hf.gate(x)
        _, weights, ids = gate(x)
    same = (ids.sort(-1).values == hf_ids.sort(-1).values).all(-1)
    by_id, hf_by_id = ids.argsort(-1), hf_ids.argsort(-1)
    assert torch.equal(weights.gather(1, by_id)[same], hf_weights.gather(1, hf_by_id)[same])


# --- backends: which kernels ran ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_block_runs_the_forced_experts_backend(backend, family):
    hf = _hf_block(family)
    block = SparseMoeBlock.from_hf(hf)
    x = torch.randn(1, 5, HIDDEN)
    with torch.no_grad(), qwen_fast.record_backends() as trace, qwen_fast.use_backend(backend):
        out = block(x)
    assert ("fused_experts", backend) in trace
    assert trace[0][0] == "fused_topk"  # routing ran through qwen_fast too (its own auto choice of backend)
    with torch.no_grad():
        assert_close(out, hf(x))


@pytest.mark.parametrize("family,compiler", [("deepseek_v3", "aot_eager"), ("qwen3_moe", "inductor")])
def test_compiles_fullgraph(family, compiler):
    hf = _hf_block(family)
    block = SparseMoeBlock.from_hf(hf)
    x = torch.randn(2, 7, HIDDEN)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    with torch.no_grad(), qwen_fast.use_backend("cpu"):
        expected = block(x)
        assert_close(compiled(x), expected)


# --- transformers' output_router_logits still works -----------------------------------------------------------------


def _tiny_qwen3_moe() -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=INTER,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)  # fmt: skip
    model = Qwen3MoeForCausalLM(config)
    _randomize(model)
    return model.eval()


@pytest.mark.parametrize("swap", ["before", "after"], ids=["swap-first", "swap-after-a-recording-run"])
def test_output_router_logits_and_aux_loss(swap):
    model = _tiny_qwen3_moe()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        if swap == "before":
            expected = model(ids, labels=ids, output_router_logits=True)
            hf_model = _tiny_qwen3_moe()  # a fresh model, whose recorder hooks are installed only after the swap
            hf_model.load_state_dict(model.state_dict())
            model = hf_model
        else:
            expected = model(ids, labels=ids, output_router_logits=True)  # hooks now sit on the HF routers
        for layer in model.model.layers:
            layer.mlp = SparseMoeBlock.from_hf(layer.mlp, hf_parity=True)
        out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == len(expected.router_logits) == 2
    # Layer 0's router sees the same input: the same logits bit for bit. Later layers see the output of qwen_fast's
    # experts, whose fp32 sums run in another order than transformers': equal within the tolerance.
    assert torch.equal(out.router_logits[0], expected.router_logits[0])
    assert_close(out.router_logits[1], expected.router_logits[1])
    assert_close(out.aux_loss, expected.aux_loss)
    assert_close(out.logits, expected.logits)
    assert_close(out.loss, expected.loss)


# --- the modules on their own ---------------------------------------------------------------------------------------


def test_router_and_experts_match_the_references():
    router = TopKRouter(HIDDEN, 12, 3, scoring_func="sigmoid", num_expert_group=4, topk_group=2,
                        routed_scaling_factor=2.5, e_score_correction_bias=True)  # fmt: skip
    with torch.no_grad():
        router.e_score_correction_bias.copy_(0.1 * torch.randn(12))
    experts = MoEExperts(12, HIDDEN, INTER)
    x = torch.randn(9, HIDDEN)
    with torch.no_grad():
        logits, weights, ids = router(x)
        out = experts(x, ids, weights)
    assert torch.equal(logits, x @ router.weight.T)
    routing = dict(scoring_func="sigmoid", num_expert_group=4, topk_group=2, routed_scaling_factor=2.5)
    ref_weights, ref_ids = topk_routing(
        logits, 3, True, e_score_correction_bias=router.e_score_correction_bias, **routing
    )
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_weights)  # the routing kernel's own exp and sums: equal within the fp32 tolerance
    assert_close(out, fused_experts(x, experts.gate_up_proj.detach(), experts.down_proj.detach(), weights, ids))
    assert sorted(dict(router.named_buffers())) == ["e_score_correction_bias"]
    assert router.weight.shape == (12, HIDDEN)
    assert experts.gate_up_proj.shape == (12, 2 * INTER, HIDDEN) and experts.down_proj.shape == (12, HIDDEN, INTER)


def test_pickle_round_trip():
    """torch.save(model) pickles classes by name: the from_hf router classes resolve (qwen_fast.nn.router)."""
    block = SparseMoeBlock.from_hf(_hf_block("deepseek_v3"))
    copy = pickle.loads(pickle.dumps(block))
    assert type(copy.gate) is type(block.gate)
    x = torch.randn(3, HIDDEN)
    with torch.no_grad():
        assert torch.equal(copy(x), block(x))


def test_mixtral_jitter_only_in_training():
    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=8, num_experts_per_tok=2,
                           router_jitter_noise=0.1)  # fmt: skip
    hf = MixtralSparseMoeBlock(config)
    _randomize(hf)
    block = SparseMoeBlock.from_hf(hf.eval())
    assert block.jitter_noise == 0.1 and not block.training
    x = torch.randn(2, 5, HIDDEN)
    before = x.clone()
    with torch.no_grad():
        assert torch.equal(block(x), block(x))  # eval: no jitter
        evaluated = block(x)
        jittered = block.train()(x)
    assert not torch.equal(jittered, evaluated)
    assert torch.equal(x, before)  # transformers jitters the caller's tensor in place; this block does not


def test_no_tokens():
    block = SparseMoeBlock.from_hf(_hf_block("qwen2_moe"))
    with torch.no_grad():
        assert block(torch.randn(0, 3, HIDDEN)).shape == (0, 3, HIDDEN)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_from_hf_rejects_other_modules():
    message = (r"SparseMoeBlock.from_hf does not support torch.nn.modules.linear.Linear; "
               r"supported transformers 5.x classes: DeepseekV3MoE, .*Qwen3MoeSparseMoeBlock")  # fmt: skip
    with pytest.raises(TypeError, match=message):
        SparseMoeBlock.from_hf(torch.nn.Linear(4, 4))
    hf = _hf_block("qwen3_moe")
    with pytest.raises(TypeError, match="TopKRouter.from_hf does not support .*Qwen3MoeExperts; .*MixtralTopKRouter"):
        TopKRouter.from_hf(hf.experts)
    with pytest.raises(TypeError, match="MoEExperts.from_hf does not support .*Qwen3MoeTopKRouter"):
        MoEExperts.from_hf(hf.gate)
    # An already converted router is not a transformers router (exact class match).
    with pytest.raises(TypeError, match="does not support qwen_fast.nn.router.QwenFastQwen3MoeTopKRouter"):
        TopKRouter.from_hf(TopKRouter.from_hf(hf.gate))
    hf.experts.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="SwiGLU .*hidden_act='gelu'"):
        MoEExperts.from_hf(hf.experts)


def test_wrong_hidden_size_at_forward():
    block = SparseMoeBlock.from_hf(_hf_block("mixtral"))
    message = rf"hidden_states must have hidden size {HIDDEN} in its last dimension, got shape \(2, 3, 31\)"
    with pytest.raises(ValueError, match=message):
        block(torch.randn(2, 3, HIDDEN - 1))
    with pytest.raises(ValueError, match=message):
        block.gate(torch.randn(2, 3, HIDDEN - 1))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"top_k": 9}, ValueError, r"topk must be in \[1, 8\], got 9"),
        ({"num_experts": 0}, ValueError, r"num_experts must be in \[1, inf\], got 0"),
        ({"scoring_func": "relu"}, ValueError, "scoring_func must be 'softmax' or 'sigmoid', got 'relu'"),
        ({"num_expert_group": 3, "topk_group": 1}, ValueError, "num_expert_group=3 must divide the number of experts"),
        ({"weights_dtype": "bf16"}, ValueError, "weights_dtype must be 'float32' or 'logits', got 'bf16'"),
        ({"index_dtype": torch.float32}, TypeError, "index_dtype must be torch.int32 or torch.int64"),
    ],
)
def test_router_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        TopKRouter(**({"hidden_size": HIDDEN, "num_experts": 8, "top_k": 2} | kwargs))


def test_block_bad_arguments():
    gate = TopKRouter(HIDDEN, 8, 2)
    with pytest.raises(ValueError, match=r"gate \(E=8, H=32\) and experts \(E=6, H=32\) must have the same"):
        SparseMoeBlock(gate, MoEExperts(6, HIDDEN, INTER))
    with pytest.raises(TypeError, match="experts must be a qwen_fast.nn.MoEExperts, got Linear"):
        SparseMoeBlock(gate, torch.nn.Linear(HIDDEN, HIDDEN))
    with pytest.raises(ValueError, match="shared_expert_gate scales shared_expert"):
        SparseMoeBlock(gate, MoEExperts(8, HIDDEN, INTER), shared_expert_gate=torch.nn.Linear(HIDDEN, 1))
    with pytest.raises(ValueError, match=r"intermediate_size must be in \[1, inf\], got 0"):
        MoEExperts(8, HIDDEN, 0)
