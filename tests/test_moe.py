"""qwen_fast.reference.moe (fused_experts, fused_moe) against transformers' own MoE blocks, and its own properties.

transformers' experts (all three of its CPU implementations: eager, grouped_mm, batched_mm) run each expert's GEMMs
in the model dtype, multiply by the routing weight in the promoted dtype (bf16 for Qwen3/Qwen2/OLMoE, whose routers
cast the weights to the model dtype; fp32 for Mixtral and DeepSeek-V3) and accumulate in the model dtype (eager:
index_add_ per expert) or sum over k (grouped_mm, batched_mm). The reference combines in fp32 and rounds once, so it
matches in fp32 tightly and in bf16 within the table. Shared experts are added with transformers' own submodules:
Qwen2-MoE adds shared_expert(x) * sigmoid(shared_expert_gate(x)), DeepSeek-V3 adds shared_experts(x).
"""

import pytest
import torch
import torch.nn.functional as F
from backends import backend_params
from numerics import assert_close
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import qwen_fast
from qwen_fast.reference.moe import fused_experts, fused_moe
from qwen_fast.reference.routing import topk_routing

HIDDEN, INTER = 64, 32  # hidden_size, moe_intermediate_size

DEEPSEEK_ROUTING = dict(scoring_func="sigmoid", num_expert_group=8, topk_group=4, routed_scaling_factor=2.5)


# family -> (block factory, top-k, renormalize, fused_topk kwargs, shared-expert output or None)
FAMILIES = {
    "qwen3_moe-norm": (lambda: Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)),
        8, True, {}, None),
    "qwen3_moe-nonorm": (lambda: Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=128, num_experts_per_tok=8, norm_topk_prob=False)),
        8, False, {}, None),
    "qwen2_moe": (lambda: Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, shared_expert_intermediate_size=2 * INTER, num_experts=60,
        num_experts_per_tok=4, norm_topk_prob=False)),
        4, False, {}, lambda block, x: F.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)),
    "mixtral": (lambda: MixtralSparseMoeBlock(MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=8, num_experts_per_tok=2)),
        2, True, {}, None),
    "olmoe": (lambda: OlmoeSparseMoeBlock(OlmoeConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False)),
        8, False, {}, None),
    "deepseek_v3": (lambda: DeepseekV3MoE(DeepseekV3Config(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=64, n_group=8, topk_group=4,
        num_experts_per_tok=8, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1)),
        8, True, DEEPSEEK_ROUTING, lambda block, x: block.shared_experts(x)),
}  # fmt: skip


def _build(family: str, dtype: torch.dtype, impl: str):
    make, *spec = FAMILIES[family]
    block = make()
    block.experts.config._experts_implementation = impl
    with torch.no_grad():
        for p in block.parameters():  # N(0, 1/fan_in): activations stay O(1) through every layer
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    block.to(dtype)
    if family == "deepseek_v3":  # an fp32 buffer in transformers (_keep_in_fp32_modules_strict)
        block.gate.e_score_correction_bias = 0.1 * torch.randn(block.gate.num_experts)
    return block, *spec


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_transformers_block(family, dtype, impl):
    block, topk, renormalize, routing_kwargs, shared_fn = _build(family, dtype, impl)
    x = torch.randn(2, 24, HIDDEN, dtype=dtype)
    with torch.no_grad():
        hf_out = block(x).view(-1, HIDDEN)
        x = x.view(-1, HIDDEN)
        logits, hf_weights, hf_ids = block.gate(x)  # HF's own router: logits, weights (cast or not), ids
        shared = shared_fn(block, x) if shared_fn else torch.zeros_like(x)
    w13, w2 = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()

    # 1. The experts alone, under transformers' own routing (its weights, in their dtype): every token.
    assert_close(fused_experts(x, w13, w2, hf_weights, hf_ids) + shared, hf_out)

    # 2. The whole layer: fused_topk + fused_experts. HF casts the routing weights to the model dtype for
    #    Qwen3/Qwen2/OLMoE and keeps fp32 for Mixtral/DeepSeek-V3: reproduce its cast.
    if family == "deepseek_v3":
        routing_kwargs = dict(routing_kwargs, e_score_correction_bias=block.gate.e_score_correction_bias)
    weights, ids = topk_routing(logits, topk, renormalize, **routing_kwargs)
    out = fused_experts(x, w13, w2, weights.to(hf_weights.dtype), ids) + shared
    # bf16 logits tie often and torch.topk breaks ties its own way (tested in test_routing.py): compare the tokens
    # routed to the same experts, which must be nearly all of them (all of them in fp32).
    same = (ids.long().sort(-1).values == hf_ids.long().sort(-1).values).all(-1)
    assert same.all() if dtype == torch.float32 else same.float().mean() >= 0.75
    assert_close(out[same], hf_out[same])
    if dtype == torch.float32:  # the cast is a no-op: this is fused_moe
        moe = fused_moe(x, w13, w2, logits, topk, renormalize, **routing_kwargs)
        assert torch.equal(moe + shared, out)


# ---------------------------------------------------------------- properties of the reference itself


def _experts(num_experts: int, dtype: torch.dtype = torch.float32, hidden: int = HIDDEN, inter: int = INTER):
    """Seeded w13 [E, 2I, H] and w2 [E, H, I] with N(0, 1/fan_in) entries, in `dtype`."""
    w13 = torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter) / inter**0.5
    return w13.to(dtype), w2.to(dtype)


def _dense(x, w13, w2, topk_weights, topk_ids, activation="silu"):
    """Every expert on every token (einsum, GEMMs and activation in the weights' dtype), then the k picked ones
    weighted and summed in fp64: the same math with no grouping by expert. gelu: x/2 * (1 + erf(x / sqrt(2)))."""
    inter = w2.shape[2]
    gate_up = torch.einsum("th,eoh->teo", x.to(w13.dtype), w13)  # [T, E, 2I]
    gate = gate_up[..., :inter]
    act_fn = F.silu(gate) if activation == "silu" else (gate.float() / 2 * (1 + torch.erf(gate.float() / 2**0.5)))
    act = act_fn.to(gate.dtype) * gate_up[..., inter:]
    y = torch.einsum("tei,ehi->teh", act, w2)  # [T, E, H]
    picked = y.gather(1, topk_ids.long()[..., None].expand(-1, -1, y.shape[-1]))  # [T, k, H]
    return (topk_weights.double()[..., None] * picked.double()).sum(1).to(x.dtype)


def _routing(case: str):
    """(T, E, topk_ids) for a named routing; ids are distinct within a token except where stated."""
    if case == "T1-E61-k8":
        return 1, 61, torch.randperm(61)[:8].view(1, 8)
    if case == "no-tokens":
        return 0, 16, torch.empty(0, 4, dtype=torch.int32)
    if case == "k=E":
        return 9, 8, torch.rand(9, 8).argsort(-1).int()
    if case == "one-expert":  # every token on expert 3
        return 20, 8, torch.full((20, 1), 3, dtype=torch.int32)
    if case == "all-share-one":  # every token has expert 5 among its two
        other = torch.randint(0, 60, (17,))
        return 17, 61, torch.stack([torch.full((17,), 5), other + (other >= 5)], dim=1)[:, torch.randperm(2)]
    if case == "few-experts":  # 58 of 61 experts get no token; int64 ids
        return 33, 61, torch.tensor([[2, 40, 60]]).expand(33, 3)[:, torch.randperm(3)]
    if case == "random":
        return 40, 61, torch.rand(40, 61).argsort(-1)[:, :6].int()
    raise ValueError(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["T1-E61-k8", "no-tokens", "k=E", "one-expert", "all-share-one", "few-experts",
                                  "random"])  # fmt: skip
def test_matches_dense_formula(case, dtype):
    num_tokens, num_experts, topk_ids = _routing(case)
    hidden, inter = 40, 24  # not multiples of any tile
    x = torch.randn(num_tokens, hidden, dtype=dtype)
    w13, w2 = _experts(num_experts, dtype, hidden, inter)
    topk_weights = torch.rand(topk_ids.shape)
    out = fused_experts(x, w13, w2, topk_weights, topk_ids)
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype
    assert_close(out, _dense(x, w13, w2, topk_weights, topk_ids))
    out = fused_experts(x, w13, w2, topk_weights, topk_ids, activation="gelu")  # GeGLU, the exact GELU
    assert_close(out, _dense(x, w13, w2, topk_weights, topk_ids, "gelu"))


def test_deterministic_and_weights_dtype():
    x, (w13, w2) = torch.randn(64, HIDDEN).bfloat16(), _experts(61, torch.bfloat16)
    weights, ids = topk_routing(torch.randn(64, 61), 8)
    out = fused_experts(x, w13, w2, weights, ids)
    assert torch.equal(out, fused_experts(x, w13, w2, weights, ids))  # same bits, run to run
    # Routing weights in the model dtype (as transformers' Qwen3 router returns them) are used as their fp32 value.
    low = weights.bfloat16()
    assert torch.equal(fused_experts(x, w13, w2, low, ids), fused_experts(x, w13, w2, low.float(), ids))
    assert torch.equal(fused_experts(x, w13, w2, weights, ids.long()), out)


class _WeightOps(TorchDispatchMode):
    """Records every aten op that receives a tensor sharing storage with the given weights."""

    def __init__(self, *weights: torch.Tensor):
        super().__init__()
        self.storages = {w.untyped_storage().data_ptr() for w in weights}
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in pytree.tree_leaves((args, kwargs or {})):
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.storages:
                self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_weights_read_in_place(layout):
    """The weights only ever reach views and GEMMs: never clone/contiguous/copy (a copy of [E, 2I, H] per call)."""
    w13, w2 = _experts(8)
    if layout == "transposed":  # the same values, stored [E, H, 2I]
        w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)
    x = torch.randn(10, HIDDEN)
    weights, ids = topk_routing(torch.randn(10, 8), 3)
    with _WeightOps(w13, w2) as mode:
        out = fused_experts(x, w13, w2, weights, ids)
    assert mode.ops == {"select", "t", "mm"}
    assert_close(out, fused_experts(x, w13.contiguous(), w2, weights, ids))


def test_fused_moe_is_topk_then_experts():
    x, (w13, w2) = torch.randn(32, HIDDEN), _experts(64)
    logits = torch.randn(32, 64)
    bias = 0.1 * torch.randn(64)
    for renormalize, kwargs in [(True, {}), (False, {}), (True, dict(DEEPSEEK_ROUTING, e_score_correction_bias=bias))]:
        weights, ids = topk_routing(logits, 8, renormalize, **kwargs)
        expected = fused_experts(x, w13, w2, weights, ids)
        assert torch.equal(fused_moe(x, w13, w2, logits, 8, renormalize, **kwargs), expected)
    assert fused_moe(x[:0], w13, w2, logits[:0], 8).shape == (0, HIDDEN)


def _expert_map(num_experts: int, local: list[int]) -> torch.Tensor:
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[local] = torch.arange(len(local), dtype=torch.int32)
    return expert_map


@pytest.mark.parametrize("backend,device", backend_params("fused_experts"))
def test_expert_map_splits_the_experts_over_ranks(backend, device):
    """Expert parallelism: each rank holds some experts (expert_map: global -> local or -1) and computes only their
    routes; the ranks' outputs add up to the unsplit layer (here two ranks: odd and even experts)."""
    x, (w1, w2) = torch.randn(9, EXPERT_H).half(), _experts(8, torch.float16, EXPERT_H, EXPERT_I)
    ids, weights = _pairs(9, 8, 3), torch.rand(9, 3)
    args = [t.to(device) for t in (x, w1, w2, weights, ids)]
    parts = []
    for local in ([1, 3, 5, 7], [0, 2, 4, 6]):
        rank_args = [args[0], args[1][local], args[2][local], args[3], args[4]]
        with qwen_fast.record_backends() as trace, qwen_fast.use_backend(backend):
            parts.append(qwen_fast.fused_experts(*rank_args, expert_map=_expert_map(8, local).to(device)).cpu())
        assert ("fused_experts", backend) in trace
        mine = torch.isin(ids, torch.tensor(local))
        assert_close(parts[-1], fused_experts(x, w1, w2, torch.where(mine, weights, 0.0), ids))
    assert_close(parts[0] + parts[1], fused_experts(x, w1, w2, weights, ids))  # fp16: the fp16 tolerance


def test_inplace_and_router_weight_on_input():
    """inplace writes the output into hidden_states (and returns it); apply_router_weight_on_input (k = 1) scales x
    by the routing weight in x's dtype and combines with weight 1: vLLM's meaning."""
    x, (w1, w2) = torch.randn(9, EXPERT_H), _experts(8, torch.float32, EXPERT_H, EXPERT_I)
    weights, ids = torch.rand(9, 1) + 0.5, torch.randint(0, 8, (9, 1), dtype=torch.int32)
    expected = fused_experts(x * weights, w1, w2, torch.ones(9, 1), ids)
    for backend in ("cpu", "torch"):
        with qwen_fast.use_backend(backend):
            out = qwen_fast.fused_experts(x, w1, w2, weights, ids, apply_router_weight_on_input=True)
            assert_close(out, expected)
            y = x.clone()
            assert qwen_fast.fused_experts(y, w1, w2, weights, ids, inplace=True) is y
            assert torch.equal(y, qwen_fast.fused_experts(x, w1, w2, weights, ids))
    assert torch.equal(
        qwen_fast.reference.fused_experts(x, w1, w2, weights, ids, apply_router_weight_on_input=True), expected
    )


def test_fused_moe_vllm_routing_options():
    """use_grouped_topk (vLLM's grouped_topk: softmax, groups scored by their max without a bias) and
    custom_routing_function replace the plain top-k."""
    x, (w1, w2), logits = torch.randn(6, HIDDEN), _experts(16), torch.randn(6, 16)
    grouped = qwen_fast.fused_moe(x, w1, w2, logits, 3, True, use_grouped_topk=True, num_expert_group=4, topk_group=2)
    weights, ids = topk_routing(logits, 3, True, num_expert_group=4, topk_group=2, group_scoring="max")
    assert_close(grouped, fused_experts(x, w1, w2, weights, ids))
    route = lambda h, g, k, r: (torch.full((6, k), 0.5), torch.arange(k).repeat(6, 1))  # noqa: E731
    out = qwen_fast.fused_moe(x, w1, w2, logits, 2, False, custom_routing_function=route)
    assert_close(out, fused_experts(x, w1, w2, *route(x, logits, 2, False)))


# --- bad input: named, value-bearing errors from qwen_fast.fused_experts and qwen_fast.fused_moe ---------------------


def _experts_args(T=3, H=8, I=4, E=4, k=2):  # noqa: E741
    weights, ids = qwen_fast.reference.topk_routing(torch.randn(T, E), k)
    x, w1, w2 = torch.randn(T, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    return {"hidden_states": x, "w1": w1, "w2": w2, "topk_weights": weights, "topk_ids": ids}


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda a: {"hidden_states": a["hidden_states"][0]}, ValueError, "hidden_states must have 2 dimensions"),
        (lambda a: {"hidden_states": a["hidden_states"].long()}, TypeError, "hidden_states must be .* got torch.int64"),
        (lambda a: {"w1": a["w1"].half()}, TypeError, "w1 must be float32 or float8_e4m3fn or int8, got torch.float16"),
        (lambda a: {"w1": a["w1"][..., :6]}, ValueError, r"w1 \[E, 2I, H\] = \(4, 8, 6\) must match hidden_states"),
        (lambda a: {"w1": a["w1"][:, :7]}, ValueError, r"w1 \[E, 2I, H\] must have an even, nonzero 2I"),
        (lambda a: {"w2": a["w2"][:, :, :3]}, ValueError, r"w2 must be \[E, H, I\] .*\(4, 8, 4\), got \(4, 8, 3\)"),
        (lambda a: {"w2": a["w2"][:3]}, ValueError, r"w2 must be \[E, H, I\] .*\(4, 8, 4\), got \(3, 8, 4\)"),
        (lambda a: {"topk_ids": a["topk_ids"].float()}, TypeError, "topk_ids must be int32 or int64, got torch.float"),
        (lambda a: {"topk_weights": a["topk_weights"][:, :1]}, ValueError, r"topk_weights must be \[T, k\]"),
        (lambda a: {"topk_ids": a["topk_ids"][:2], "topk_weights": a["topk_weights"][:2]}, ValueError,
         "must have hidden_states' T = 3 rows"),
        (lambda a: {"topk_ids": a["topk_ids"] + 4}, ValueError, r"topk_ids must lie in \[0, 4\)"),
        (lambda a: {"w2": a["w2"].to("meta")}, ValueError, "w2 must be on cpu like the other inputs, got meta"),
        (lambda a: {"activation": "relu"}, ValueError, "activation 'relu' is not supported: the experts are gated 'si"),
        (lambda a: {"is_act_and_mul": False}, ValueError, "is_act_and_mul=False is not supported"),
        (lambda a: {"use_int8_w8a8": True}, ValueError, "use_int8_w8a8=True is not supported: qwen_fast's quantiz"),
        (lambda a: {"a1_scale": torch.ones(1)}, ValueError, "a1_scale was given, which is not supported"),
        (lambda a: {"w2_bias": torch.zeros(4, 8)}, ValueError, "w2_bias was given: expert biases are not supported"),
        (lambda a: {"inplace": 1}, TypeError, "inplace must be a bool, got int 1"),
        (lambda a: {"apply_router_weight_on_input": True}, ValueError, "needs topk == 1 .* got k = 2"),
        (lambda a: {"global_num_experts": 6}, ValueError, "global_num_experts=6 differs from w1's E = 4 without an ex"),
        (lambda a: {"expert_map": torch.arange(4)}, TypeError, "expert_map must be int32, got torch.int64"),
        (lambda a: {"expert_map": torch.arange(4, dtype=torch.int32), "global_num_experts": 5}, ValueError,
         r"expert_map must be \[num_experts\] = \[5\]"),
        (lambda a: {"expert_map": torch.tensor([0, 1, 2, 4, -1], dtype=torch.int32)}, ValueError,
         r"local expert ids in \[-1, 4\) \(w1's E = 4\) .*got \[-1, 4\]"),
        (lambda a: {"expert_map": torch.tensor([0, -1, 1, -1], dtype=torch.int32), "topk_ids": a["topk_ids"] + 4},
         ValueError, r"topk_ids must lie in \[0, 4\) \(num_experts=4\)"),
    ],
)  # fmt: skip
def test_fused_experts_bad_input(change, error, message):
    args = _experts_args()
    with pytest.raises(error, match=message):
        qwen_fast.fused_experts(**(args | change(args)))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (
            {"gating_output": torch.randn(3, 5)},
            ValueError,
            r"gating_output must be \[T, global E\] = \(3, 4\), got \(3, 5",
        ),
        (
            {"gating_output": torch.randn(2, 4)},
            ValueError,
            r"gating_output must be \[T, global E\] = \(3, 4\), got \(2, 4",
        ),
        ({"topk": 5}, ValueError, r"topk must be in \[1, 4\], got 5"),
        ({"scoring_func": "tanh"}, ValueError, "scoring_func must be 'softmax' or 'sigmoid', got 'tanh'"),
        ({"num_groups": 2}, TypeError, "unexpected keyword argument 'num_groups'"),
        ({"num_expert_group": 2, "topk_group": 1}, ValueError, "need use_grouped_topk=True"),
        ({"use_grouped_topk": True}, ValueError, "use_grouped_topk=True needs num_expert_group and topk_group"),
        ({"custom_routing_function": 3}, TypeError, "custom_routing_function must be callable, got int"),
        ({"use_mxfp4_w4a4": True}, ValueError, "use_mxfp4_w4a4=True is not supported"),
        (
            {"expert_map": torch.tensor([0, 1, 2, 3, -1], dtype=torch.int32)},
            ValueError,
            r"gating_output must be \[T, global E\] = \(3, 5\), got \(3, 4\)",
        ),
    ],
)
def test_fused_moe_bad_input(kwargs, error, message):
    args = {name: _experts_args()[name] for name in ("hidden_states", "w1", "w2")}
    call = args | {"gating_output": torch.randn(3, 4), "topk": 2} | kwargs
    with pytest.raises(error, match=message):
        qwen_fast.fused_moe(**call)


# --- kernels: every backend on every sample is tests/test_ops.py; here their own tile paths and properties ----------

EXPERT_H, EXPERT_I = 40, 24  # not multiples of any tile


def _pairs(num_tokens: int, num_experts: int, topk: int, case: str = "random") -> torch.Tensor:
    """int32 [T, k] expert ids, distinct within a token; 'sparse': every token on the same k of E experts."""
    if case == "sparse":
        chosen = torch.randperm(num_experts)[:topk]
        return chosen.expand(num_tokens, topk)[:, torch.randperm(topk)].int()
    return torch.rand(num_tokens, num_experts).argsort(-1)[:, :topk].int()


def _expert_inputs(num_tokens, num_experts, topk, dtype, device="cpu"):
    ids = _pairs(num_tokens, num_experts, topk)
    x = torch.randn(num_tokens, EXPERT_H).to(dtype)
    w13, w2 = _experts(num_experts, dtype, EXPERT_H, EXPERT_I)
    return [t.to(device) for t in (x, w13, w2, torch.rand(ids.shape), ids)]


def _run(backend, *args):
    with qwen_fast.record_backends() as trace, qwen_fast.use_backend(backend):
        out = qwen_fast.fused_experts(*args)
    assert ("fused_experts", backend) in trace
    return out


@pytest.mark.parametrize("backend,device", backend_params("fused_experts", kernels_only=True))
def test_fused_experts_same_bits_run_to_run(backend, device):
    args = _expert_inputs(64, 8, 2, torch.float16, device)
    assert torch.equal(_run(backend, *args), _run(backend, *args))


def _tile_routing(case: str) -> tuple[int, int, torch.Tensor]:
    """(T, E, topk_ids) that put experts on each tile form of the cpu kernel: an expert with fewer than 32 routed
    rows runs dot tiles of 4 rows, one with 32 or more packs its weights and runs outer tiles of 6 rows."""
    if case.startswith("one-expert-"):  # every token on expert 3 (k = 1), T = 31, 32, 37: each side of the switch
        num_tokens = int(case.split("-")[-1])
        return num_tokens, 8, torch.full((num_tokens, 1), 3, dtype=torch.int32)
    if case == "mixed":  # 40 rows on expert 3 (outer tiles), 5 or so on each other expert (dot tiles)
        other = torch.randint(0, 7, (40,))
        return 40, 8, torch.stack([torch.full((40,), 3), other + (other >= 3)], dim=1).int()
    if case == "sparse":  # 45 rows on each of 3 experts of 61, the other 58 empty
        return 45, 61, _pairs(45, 61, 3, "sparse")
    if case == "decode":
        return 1, 8, _pairs(1, 8, 2)
    return 64, 16, _pairs(64, 16, 4)  # "random": about 16 rows per expert


@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden,inter", [(36, 20), (72, 40)])
@pytest.mark.parametrize("case", ["decode", "one-expert-31", "one-expert-32", "one-expert-37", "mixed", "sparse",
                                  "random"])  # fmt: skip
def test_fused_experts_cpu_tile_paths(case, hidden, inter, dtype, scale):
    """The cpu kernel's two tile forms (see _tile_routing) and their remainders against the reference: partial row
    tiles; H and I not multiples of the 8-lane vectors, of the 16-column gate/up blocks or of the 32-column down
    blocks; experts with no tokens. scale 30 drives the gate to +-100 and beyond, where exp in silu saturates."""
    num_tokens, num_experts, ids = _tile_routing(case)
    x = scale * torch.randn(num_tokens, hidden).to(dtype)
    w13, w2 = _experts(num_experts, dtype, hidden, inter)
    weights = torch.rand(ids.shape)
    out = _run("cpu", x, w13, w2, weights, ids)
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype
    assert_close(out / scale, fused_experts(x, w13, w2, weights, ids) / scale)  # the table is for O(1) terms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_experts_cpu_same_bits_for_any_thread_count(dtype):
    """Each output element is computed by one work item in a fixed order, whatever the split over threads: 1, 2
    and 3 threads give the same bits (routing "mixed": experts on both tile forms)."""
    num_tokens, num_experts, ids = _tile_routing("mixed")
    x = torch.randn(num_tokens, EXPERT_H).to(dtype)
    w13, w2 = _experts(num_experts, dtype, EXPERT_H, EXPERT_I)
    args = (x, w13, w2, torch.rand(ids.shape), ids)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_run("cpu", *args))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], out) for out in outs[1:])


def test_fused_experts_native_checks_its_arguments():
    """Direct torch.ops calls skip the Python checks: the C++ op names the bad argument and its value."""
    x, w13, w2, weights, ids = _expert_inputs(5, 8, 2, torch.float32, "cpu")
    with pytest.raises(
        RuntimeError, match=r"topk_ids must lie in \[-1, 8\) \(-1: an expert of another rank\), got 8 at"
    ):
        torch.ops.qwen_fast.fused_experts(x, w13, w2, weights, torch.where(torch.arange(10).view(5, 2) == 3, 8, ids))
    with pytest.raises(RuntimeError, match="w13 and w2 must have hidden_states' dtype"):
        torch.ops.qwen_fast.fused_experts(x, w13.half(), w2, weights, ids)
    with pytest.raises(RuntimeError, match=r"w2 must be \[E, H, I\]"):
        torch.ops.qwen_fast.fused_experts(x, w13, w2[:, :, :5], weights, ids)


@pytest.mark.parametrize("num_tokens,block_m", [(8, 16), (24, 32), (64, 64), (72, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.interpret
def test_fused_experts_triton_every_block_m(num_tokens, block_m, dtype):
    """Each BLOCK_M the heuristic can pick (E = 8, k = 8: T*k/E = T rows per expert) against the reference."""
    assert qwen_fast.ops.moe_align.choose_block_size(num_tokens, 8, 8) == block_m
    args = _expert_inputs(num_tokens, 8, 8, dtype)
    assert_close(_run("triton", *args), fused_experts(*args))


@pytest.mark.parametrize("backend,device", backend_params("fused_moe", kernels_only=True))
def test_fused_moe_runs_every_inner_op_on_the_forced_backend(backend, device):
    """A forced backend runs fused_moe's fused_topk, moe_align_block_size (triton's fused_experts) and
    fused_experts on that backend."""
    num_tokens = 9
    routing = {"scoring_func": "sigmoid", "use_grouped_topk": True, "num_expert_group": 4, "topk_group": 2}
    x = torch.randn(num_tokens, EXPERT_H).half()
    w13, w2 = _experts(8, torch.float16, EXPERT_H, EXPERT_I)
    logits = torch.randn(num_tokens, 8)
    args = [t.to(device) for t in (x, w13, w2, logits)]
    with qwen_fast.record_backends() as trace, qwen_fast.use_backend(backend):
        out = qwen_fast.fused_moe(*args, topk=2, **routing)
    assert trace[0] == ("fused_moe", backend) and {b for _, b in trace} == {backend}
    inner = (
        ["fused_topk", "fused_experts", "moe_align_block_size"]
        if backend == "triton"
        else ["fused_topk", "fused_experts"]
    )
    assert [op for op, _ in trace[1:]] == inner
    assert_close(out.cpu(), fused_moe(x, w13, w2, logits, 2, **routing))


@pytest.mark.gpu
@pytest.mark.slow
def test_fused_experts_triton_past_int32_offsets():
    """T * k * H > 2^31: the rows of y [T*k, H] at the end of the batch sit past int32 element offsets (Qwen3-MoE at
    131k tokens got there), so the kernels' offsets must be int64."""
    num_tokens, topk, hidden, inter, num_experts = 33_000, 8, 8192, 64, 8
    assert num_tokens * topk * hidden > 2**31
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") / hidden**0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda") / inter**0.5).bfloat16()
    weights, ids = topk_routing(torch.randn(num_tokens, num_experts, device="cuda"), topk)
    with qwen_fast.use_backend("triton"), qwen_fast.record_backends() as calls:
        out = qwen_fast.fused_experts(x, w13, w2, weights, ids)
    assert calls == [("fused_experts", "triton")]
    tail = slice(num_tokens - 64, num_tokens)  # the tokens whose pair rows lie past 2^31 elements
    assert_close(out[tail], fused_experts(x[tail], w13, w2, weights[tail], ids[tail]))
