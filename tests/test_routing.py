"""qwen_fast.reference.routing.topk_routing (fused_topk's routing) against transformers' routers, and its properties.

What transformers 5.23 does (pinned by the tests below):
- Qwen3-MoE, Qwen2-MoE, OLMoE: logits in the model dtype, softmax(dtype=float32), torch.topk, divide by the sum iff
  norm_topk_prob, then cast the weights to the model dtype (bf16 weights in a bf16 model).
- Mixtral: softmax(logits.float()), torch.topk, always renormalize, the weights stay fp32.
- DeepSeek-V3: logits computed in fp32 (both operands upcast), sigmoid, + e_score_correction_bias (an fp32 buffer,
  zeros by default), group score = sum of the top-2 per group, unsorted top-k over the kept groups, weights gathered
  from the unbiased scores, / (sum + 1e-20) iff norm_topk_prob, x routed_scaling_factor always.
torch.topk breaks ties arbitrarily (not to the lower index), and bf16 logits tie often, so the comparison with
transformers accepts a different pick only where the selection scores are exactly equal.
"""

import pytest
import torch
from backends import backend_params
from numerics import assert_close
from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

import qwen_fast
from qwen_fast.reference.routing import topk_routing

HIDDEN = 64
TOKENS = 64


def _canonical(ids: torch.Tensor, weights: torch.Tensor, choice: torch.Tensor):
    """Reorder each row of (ids, weights) by selection score descending, ties by ascending id (fused_topk's order)."""
    ids = ids.long()
    by_id = ids.argsort(dim=-1)
    ids, weights = ids.gather(1, by_id), weights.gather(1, by_id)
    by_score = torch.sort(choice.gather(1, ids), dim=-1, descending=True, stable=True).indices
    return ids.gather(1, by_score), weights.gather(1, by_score)


def assert_same_routing(ids, weights, hf_ids, hf_weights, choice) -> None:
    """fused_topk's (ids, weights) vs transformers' (any order). choice: [T, E] fp32 selection scores.

    Position by position, both picks have exactly the same selection score (both are a top-k of `choice`); the ids
    may differ only where that score is shared with another expert (a tie transformers broke its own way); the
    weights agree within the table for their dtype.
    """
    ids = ids.long()
    hf_ids, hf_weights = _canonical(hf_ids, hf_weights, choice)
    picked = choice.gather(1, ids)
    assert torch.equal(picked, choice.gather(1, hf_ids)), "the selected scores differ: not the same top-k"
    tied = (choice.unsqueeze(1) == picked.unsqueeze(2)).sum(dim=-1) > 1  # [T, k]
    assert ((ids == hf_ids) | tied).all(), "ids differ where there is no tie"
    assert_close(weights.to(hf_weights.dtype), hf_weights)


def _randomize(module: torch.nn.Module) -> None:
    """Seeded N(0, 1/fan_in) weights, so router logits are O(1)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


# family -> (router class, config, renormalize in HF, whether HF casts the weights to the model dtype)
SOFTMAX_ROUTERS = {
    "qwen3_moe-norm": (Qwen3MoeTopKRouter, lambda: Qwen3MoeConfig(num_experts=128, num_experts_per_tok=8,
                                                                  norm_topk_prob=True), True, True),
    "qwen3_moe-nonorm": (Qwen3MoeTopKRouter, lambda: Qwen3MoeConfig(num_experts=128, num_experts_per_tok=8,
                                                                    norm_topk_prob=False), False, True),
    "qwen2_moe": (Qwen2MoeTopKRouter, lambda: Qwen2MoeConfig(num_experts=60, num_experts_per_tok=4), False, True),
    "qwen2_moe-norm": (Qwen2MoeTopKRouter, lambda: Qwen2MoeConfig(num_experts=60, num_experts_per_tok=4,
                                                                  norm_topk_prob=True), True, True),
    "mixtral": (MixtralTopKRouter, lambda: MixtralConfig(num_local_experts=8, num_experts_per_tok=2), True, False),
    "olmoe": (OlmoeTopKRouter, lambda: OlmoeConfig(num_experts=64, num_experts_per_tok=8), False, True),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(SOFTMAX_ROUTERS))
def test_softmax_router_matches_transformers(family, dtype):
    router_cls, make_config, renormalize, casts = SOFTMAX_ROUTERS[family]
    config = make_config()
    config.hidden_size = HIDDEN
    router = router_cls(config)
    _randomize(router)
    router.to(dtype)
    x = torch.randn(TOKENS, HIDDEN, dtype=dtype)
    with torch.no_grad():
        logits, hf_weights, hf_ids = router(x)

    assert logits.dtype == dtype  # logits in the model dtype
    assert hf_weights.dtype == (dtype if casts else torch.float32)  # the cast HF does (or not, Mixtral)
    weights, ids = topk_routing(logits, config.num_experts_per_tok, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    choice = torch.softmax(logits.float(), dim=-1)
    assert_same_routing(ids, weights, hf_ids, hf_weights, choice)


def _deepseek_router(dtype: torch.dtype, norm: bool, bias: bool) -> DeepseekV3TopkRouter:
    """DeepSeek-V3's routing at its real expert counts: 256 experts in 8 groups, 4 groups kept, top-8, x 2.5."""
    config = DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=256, n_group=8, topk_group=4,
                              num_experts_per_tok=8, routed_scaling_factor=2.5, norm_topk_prob=norm)  # fmt: skip
    router = DeepseekV3TopkRouter(config)
    _randomize(router)
    router.to(dtype)
    # transformers keeps this buffer in fp32 (_keep_in_fp32_modules_strict); module.to() would not.
    router.e_score_correction_bias = (0.1 * torch.randn(256)) if bias else torch.zeros(256)
    return router


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "zero-bias"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deepseek_v3_router_matches_transformers(dtype, norm, bias):
    router = _deepseek_router(dtype, norm, bias)
    x = torch.randn(TOKENS, HIDDEN, dtype=dtype)
    with torch.no_grad():
        logits, hf_weights, hf_ids = router(x)
    assert logits.dtype == torch.float32  # DeepSeek-V3 computes its router logits in fp32 even in a bf16 model
    assert hf_weights.dtype == torch.float32

    kwargs = dict(scoring_func="sigmoid", num_expert_group=8, topk_group=4, routed_scaling_factor=2.5,
                  group_scoring="top2_sum")  # fmt: skip
    # With zero bias, transformers still adds its (zero) buffer: passing None (with DeepSeek-V3's group scoring
    # named, as qwen_fast's DeepSeek-V3 router does) must give the same routing.
    e_bias = router.e_score_correction_bias if bias else None
    weights, ids = topk_routing(logits, 8, norm, e_score_correction_bias=e_bias, **kwargs)
    choice = logits.sigmoid() + router.e_score_correction_bias
    assert_same_routing(ids, weights, hf_ids, hf_weights, choice)

    # The inputs exercise the group limit: a plain top-8 picks other experts for some tokens.
    _, plain_ids = topk_routing(logits, 8, norm, scoring_func="sigmoid", e_score_correction_bias=e_bias)
    assert (plain_ids.sort(-1).values != ids.sort(-1).values).any(-1).any()


# Group 0 has the single best expert (sigmoid(3) = 0.95, then 0.007s); group 1 has two good ones (0.62 + 0.62).
GROUP_LOGITS = torch.tensor([[3.0, -5.0, -5.0, -5.0, 0.5, 0.5, -5.0, -5.0]])
GROUPS = {"scoring_func": "sigmoid", "num_expert_group": 2, "topk_group": 1}


def test_group_score_follows_vllm_rule_by_default():
    """vLLM's grouped_topk (and DeepSeek-V2) score a group by its max without a correction bias, by the sum of its
    top-2 with one (DeepSeek-V3); group_scoring overrides the rule either way."""
    _, ids = topk_routing(GROUP_LOGITS, 2, False, **GROUPS)  # no bias: the max, group 0 (0.95 > 0.62)
    assert ids.tolist() == [[0, 1]]  # then the lower index among the tied 0.007s
    assert topk_routing(GROUP_LOGITS, 2, False, group_scoring="max", **GROUPS)[1].tolist() == [[0, 1]]
    zero = torch.zeros(8)
    _, ids = topk_routing(GROUP_LOGITS, 2, False, e_score_correction_bias=zero, **GROUPS)  # bias: the top-2 sum
    assert ids.tolist() == [[4, 5]]
    _, ids = topk_routing(GROUP_LOGITS, 2, False, e_score_correction_bias=zero, group_scoring="max", **GROUPS)
    assert ids.tolist() == [[0, 1]]


def test_group_score_is_top2_sum_as_transformers():
    """Group score = largest + second largest (group_scoring="top2_sum", DeepSeek-V3's), as transformers'."""
    logits = GROUP_LOGITS
    weights, ids = topk_routing(logits, 2, False, group_scoring="top2_sum", **GROUPS)
    assert ids.tolist() == [[4, 5]]
    assert torch.equal(weights, logits.sigmoid()[:, 4:6])

    # The same in transformers: hidden = ones and a diagonal router weight make its logits exactly these.
    config = DeepseekV3Config(hidden_size=8, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                              routed_scaling_factor=1.0, norm_topk_prob=False)  # fmt: skip
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.diag(logits[0]))
        hf_logits, hf_weights, hf_ids = router(torch.ones(1, 8))
    assert torch.equal(hf_logits, logits)
    assert hf_ids.sort(-1).values.tolist() == [[4, 5]]


# ---------------------------------------------------------------- properties of the reference itself


def _brute_force(logits, k, renormalize, scoring_func, bias, groups, topk_group, scale, group_scoring=None):
    """The same math, one token and one expert at a time in plain Python lists (an independent statement). A group
    scores the sum of its top-2 (group_scoring "top2_sum", or None with a bias) or its top-1."""
    top = 2 if group_scoring == "top2_sum" or (group_scoring is None and bias is not None) else 1
    scores = torch.softmax(logits.float(), -1) if scoring_func == "softmax" else logits.float().sigmoid()
    all_ids, all_weights = [], []
    for row in scores.tolist():
        num_experts = len(row)
        choice = [s + (bias[e] if bias is not None else 0.0) for e, s in enumerate(row)]
        allowed = set(range(num_experts))
        if groups is not None:
            size = num_experts // groups
            group_score = [sum(sorted(choice[g * size : (g + 1) * size], reverse=True)[:top]) for g in range(groups)]
            kept = sorted(range(groups), key=lambda g: (-group_score[g], g))[:topk_group]
            allowed = {e for e in range(num_experts) if e // size in kept}
        ids = sorted(allowed, key=lambda e: (-choice[e], e))[:k]
        w = [row[e] for e in ids]
        if renormalize:
            w = [v / sum(w) for v in w]
        all_ids.append(ids)
        all_weights.append([v * scale for v in w])
    return torch.tensor(all_weights, dtype=torch.float64), torch.tensor(all_ids, dtype=torch.int32)


CASES = {
    # name: (T, E, k, renormalize, routing kwargs)
    "T1-E61-k8": (1, 61, 8, True, {}),
    "E61-k1-nonorm": (9, 61, 1, False, {}),
    "k=E": (5, 16, 16, True, {}),
    "k=E-prime": (3, 61, 61, False, {}),
    "sigmoid": (7, 32, 4, True, {"scoring_func": "sigmoid"}),
    "sigmoid-bias-groups": (11, 64, 6, True, {"scoring_func": "sigmoid", "bias": True, "num_expert_group": 8,
                                              "topk_group": 3, "routed_scaling_factor": 2.5}),
    "softmax-groups-nobias": (6, 24, 3, False, {"num_expert_group": 4, "topk_group": 2}),
    "groups-of-one": (4, 8, 2, True, {"scoring_func": "sigmoid", "num_expert_group": 8, "topk_group": 3}),
    "groups-top2-nobias": (6, 24, 3, False, {"num_expert_group": 4, "topk_group": 2, "group_scoring": "top2_sum"}),
    "groups-max-bias": (11, 64, 6, True, {"scoring_func": "sigmoid", "bias": True, "num_expert_group": 8,
                                          "topk_group": 3, "group_scoring": "max"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_matches_brute_force(case):
    num_tokens, num_experts, k, renormalize, kwargs = CASES[case]
    kwargs = dict(kwargs)
    # Coarse logits (multiples of 1/4) so that exact ties occur and the tie-break is exercised.
    logits = torch.randint(-8, 8, (num_tokens, num_experts)).float() / 4
    bias = (torch.randint(-4, 4, (num_experts,)).float() / 8) if kwargs.pop("bias", False) else None
    weights, ids = topk_routing(logits, k, renormalize, e_score_correction_bias=bias, **kwargs)
    expected_w, expected_ids = _brute_force(
        logits, k, renormalize, kwargs.get("scoring_func", "softmax"), None if bias is None else bias.tolist(),
        kwargs.get("num_expert_group"), kwargs.get("topk_group"), kwargs.get("routed_scaling_factor", 1.0),
        kwargs.get("group_scoring"),
    )  # fmt: skip
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, expected_ids)
    assert_close(weights, expected_w.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ties_go_to_the_lower_index(dtype):
    logits = torch.zeros(3, 70, dtype=dtype)  # torch.topk(..., 5) picks 46, 48, 47, 49, 45 here on CPU
    weights, ids = topk_routing(logits, 5, True)
    assert ids.tolist() == [[0, 1, 2, 3, 4]] * 3
    assert_close(weights, torch.full((3, 5), 0.2))
    weights, _ = topk_routing(logits, 5, False)
    assert_close(weights, torch.full((3, 5), 1 / 70))

    _, ids = topk_routing(torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0]], dtype=dtype), 2)
    assert ids.tolist() == [[1, 3]]
    # Tied groups: groups 1 and 3 tie for best, the lower one is kept.
    logits = torch.tensor([[0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 5.0, 5.0]], dtype=dtype)
    _, ids = topk_routing(logits, 2, scoring_func="sigmoid", num_expert_group=4, topk_group=1)
    assert ids.tolist() == [[2, 3]]


def test_bias_selects_but_does_not_weigh():
    logits = torch.randn(16, 32)
    bias = torch.zeros(32)
    bias[31] = 10.0  # expert 31 always wins the selection
    weights, ids = topk_routing(logits, 4, False, scoring_func="sigmoid", e_score_correction_bias=bias)
    assert (ids[:, 0] == 31).all()
    assert torch.equal(weights[:, 0], logits.sigmoid()[:, 31])
    assert torch.equal(weights, logits.sigmoid().gather(1, ids.long()))


@pytest.mark.parametrize("renormalize", [True, False])
def test_scaling_and_renormalize(renormalize):
    logits = torch.randn(10, 61)
    weights, ids = topk_routing(logits, 7, renormalize, routed_scaling_factor=2.5)
    probs = torch.softmax(logits, -1).gather(1, ids.long())
    expected = probs / probs.sum(-1, keepdim=True) if renormalize else probs
    assert torch.equal(weights, expected * 2.5)
    assert torch.equal(ids, torch.sort(logits, -1, descending=True).indices[:, :7].int())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_upcast(dtype):
    logits = torch.randn(8, 61).to(dtype)
    for kwargs in ({}, {"scoring_func": "sigmoid", "num_expert_group": 1, "topk_group": 1}):
        low = topk_routing(logits, 6, **kwargs)
        high = topk_routing(logits.float(), 6, **kwargs)
        assert torch.equal(low[0], high[0]) and torch.equal(low[1], high[1])


@pytest.mark.parametrize("kwargs", [{}, {"scoring_func": "sigmoid", "num_expert_group": 4, "topk_group": 2}])
def test_no_tokens(kwargs):
    weights, ids = topk_routing(torch.randn(0, 16), 4, **kwargs)
    assert weights.shape == (0, 4) and weights.dtype == torch.float32
    assert ids.shape == (0, 4) and ids.dtype == torch.int32


# --- bad input: named, value-bearing errors from qwen_fast.fused_topk ------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"gating_output": [[1.0, 2.0]]}, TypeError, "gating_output must be a torch.Tensor, got list"),
        ({"gating_output": torch.randn(4)}, ValueError, r"gating_output must have 2 dimensions, got shape \(4,\)"),
        ({"gating_output": torch.zeros(3, 8).long()}, TypeError, "gating_output must be .* got torch.int64"),
        ({"gating_output": torch.zeros(3, 0)}, ValueError, "at least one expert"),
        ({"topk": 9}, ValueError, r"topk must be in \[1, 8\], got 9"),
        ({"topk": 0}, ValueError, r"topk must be in \[1, 8\], got 0"),
        ({"topk": 2.0}, TypeError, "topk must be an int, got float 2.0"),
        ({"renormalize": "yes"}, TypeError, "renormalize must be a bool, got str 'yes'"),
        ({"scoring_func": "relu"}, ValueError, "scoring_func must be 'softmax' or 'sigmoid', got 'relu'"),
        ({"e_score_correction_bias": torch.zeros(7)}, ValueError, r"correction_bias must be \[E\].*\(8,\), got \(7,\)"),
        ({"num_expert_group": 4}, ValueError, "num_expert_group and topk_group go together"),
        ({"num_expert_group": 3, "topk_group": 1}, ValueError, "num_expert_group=3 must divide the number of exp"),
        ({"num_expert_group": 4, "topk_group": 5}, ValueError, r"topk_group must be in \[1, 4\], got 5"),
        ({"num_expert_group": 4, "topk_group": 1, "topk": 3}, ValueError, "topk=3 exceeds the 2 experts of topk_gr"),
        ({"routed_scaling_factor": float("nan")}, ValueError, "routed_scaling_factor must be finite and > 0, got nan"),
        ({"routed_scaling_factor": "2"}, TypeError, "routed_scaling_factor must be a float, got str"),
        ({"group_scoring": "sum"}, ValueError, "group_scoring must be None, 'max' or 'top2_sum', got 'sum'"),
        ({"indices_type": torch.int16}, TypeError, "indices_type must be None, torch.int32 or torch.int64, got tor"),
        ({"hidden_states": torch.randn(4, 4)}, ValueError, r"hidden_states \[T, H\] = \(4, 4\) and gating_output"),
        ({"hidden_states": torch.randn(3)}, ValueError, r"hidden_states must have 2 dimensions, got shape \(3,\)"),
    ],
)  # fmt: skip
def test_fused_topk_bad_input(kwargs, error, message):
    args = {"hidden_states": torch.randn(3, 4), "gating_output": torch.randn(3, 8), "topk": 2} | kwargs
    with pytest.raises(error, match=message):
        qwen_fast.fused_topk(**args)


# --- kernels: the one place they may order experts differently from the reference ----------------------------------
# Every backend against the reference on every sample (ids bit for bit, exact ties included): tests/test_ops.py.


@pytest.mark.parametrize("backend,device", backend_params("fused_topk"))
def test_fp32_near_ties_flip_only_within_ulps(backend, device):
    """fp32 logits zero to three ulps apart: the one place where a kernel may order two experts differently from the
    reference, and exactly why.

    Softmax scores are exp(x - max) * (1 / sum). Logits a few ulps apart give true scores a few ulps apart (or the
    same score, when x - max rounds them together). The kernels use their own exp (glibc expf, CUDA expf, Triton's
    exp) and sum the E terms in their own order, so a kernel's score can differ from torch's in the last bit or two,
    and with it the order of two such experts or whether they tie. Measured with the cpu kernel on this data (pairs of
    N(0, 1) logits, each moved up by 0 to 3 ulps; T = 256, E = 128, k = E): about 120 of the 32,768 positions differ,
    every one between experts whose reference scores are at most 2 ulps apart. The bound asserted is 4 ulps (CUDA's
    expf is within 2 ulps, glibc's and Sleef's within 1): ids differing anywhere else fail the test.
    """
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(256, 64, generator=gen).repeat_interleave(2, dim=1)
    steps = torch.randint(0, 4, logits.shape, generator=gen)
    for step in (1, 2, 3):
        logits = torch.where(steps >= step, torch.nextafter(logits, torch.full_like(logits, float("inf"))), logits)
    topk = 128 if not (backend == "triton" and device == "cpu") else 8
    expected_w, expected_ids = topk_routing(logits, topk, True)
    with qwen_fast.use_backend(backend), qwen_fast.record_backends() as calls:
        logits = logits.to(device)
        weights, ids, _ = (t.cpu() for t in qwen_fast.fused_topk(logits, logits, topk, True))
        logits = logits.cpu()
    assert calls == [("fused_topk", backend)]
    scores = torch.softmax(logits, dim=-1)
    differ = ids != expected_ids
    got_scores = scores.gather(1, ids.long())[differ]
    ref_scores = scores.gather(1, expected_ids.long())[differ]
    ulp = torch.nextafter(ref_scores, torch.full_like(ref_scores, float("inf"))) - ref_scores
    assert ((got_scores - ref_scores).abs() <= 4 * ulp).all(), "ids differ beyond a 4-ulp near tie"
    if topk == 128:
        assert torch.equal(ids.sort(-1).values, expected_ids.sort(-1).values), "k = E picks every expert once"
    assert_close(weights, expected_w)


# --- the native op's own checks, the expert limit, auto's choice --------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (
            (torch.randn(3, 2000), 2, True, "softmax", None, None, None, 1.0, "max"),
            "the kernels take 1 to 1024 experts",
        ),
        ((torch.randn(3), 2, True, "softmax", None, None, None, 1.0, "max"), r"gating_output must be \[T, E\]"),
        ((torch.zeros(3, 8, dtype=torch.int32), 2, True, "softmax", None, None, None, 1.0, "max"), "got Int"),
        ((torch.randn(3, 8), 0, True, "softmax", None, None, None, 1.0, "max"), r"topk must be in \[1, E = 8\], got 0"),
        ((torch.randn(3, 8), 9, True, "softmax", None, None, None, 1.0, "max"), r"topk must be in \[1, E = 8\], got 9"),
        (
            (torch.randn(3, 8), 2, True, "relu", None, None, None, 1.0, "max"),
            "scoring_func must be 'softmax' or 'sigmoid'",
        ),
        ((torch.randn(3, 8), 2, True, "sigmoid", torch.randn(7), None, None, 1.0, "max"), r"must be \[E\] = \[8\]"),
        ((torch.randn(3, 8), 2, True, "sigmoid", None, 3, 1, 1.0, "max"), "num_expert_group must divide E = 8, got 3"),
        ((torch.randn(3, 8), 2, True, "sigmoid", None, 4, None, 1.0, "max"), "go together"),
        (
            (torch.randn(3, 8), 2, True, "sigmoid", None, 4, 5, 1.0, "max"),
            r"topk_group must be in \[1, num_expert_group",
        ),
        ((torch.randn(3, 8), 3, True, "sigmoid", None, 4, 1, 1.0, "max"), "topk = 3 exceeds the 2 experts"),
        (
            (torch.randn(3, 8), 2, True, "softmax", None, None, None, float("inf"), "max"),
            "routed_scaling_factor must be",
        ),
        ((torch.randn(3, 8), 2, True, "softmax", None, 4, 2, 1.0, "sum"), "group_scoring must be 'max' or 'top2_sum'"),
    ],
)
def test_fused_topk_native_op_rejects_bad_input(args, message):
    """Direct torch.ops calls skip the Python checks: the C++ checks raise a RuntimeError, never crash."""
    with pytest.raises(RuntimeError, match=message):
        torch.ops.qwen_fast.fused_topk(*args)


def test_fused_topk_expert_limit_is_named():
    """Past the kernels' 1024 experts, auto takes the reference; a forced kernel backend names the limit."""
    with (
        qwen_fast.use_backend("cpu"),
        pytest.raises(
            RuntimeError,
            match="backend 'cpu' is forced but cannot run here: the kernels take 1 to 1024 "
            "experts, got E = 1025. Usable for cpu tensors: torch",
        ),
    ):
        qwen_fast.fused_topk(torch.randn(2, 8), torch.randn(2, 1025), 2)
    with qwen_fast.record_backends() as calls:
        assert qwen_fast.fused_topk(torch.randn(2, 8), torch.randn(2, 1025), 2)[1].shape == (2, 2)
        assert qwen_fast.fused_topk(torch.randn(2, 8), torch.randn(2, 1024), 2)[1].shape == (2, 2)
    assert calls == [("fused_topk", "torch"), ("fused_topk", "cpu")]
    with qwen_fast.record_backends() as calls:  # the experts still run on the cpu kernel, the routing on torch
        x, w13, w2 = torch.randn(2, 8), torch.randn(1025, 8, 8), torch.randn(1025, 8, 4)
        assert qwen_fast.fused_moe(x, w13, w2, torch.randn(2, 1025), 2).shape == (2, 8)
    assert calls[0] == ("fused_moe", "cpu") and ("fused_topk", "torch") in calls


def test_fused_topk_auto_picks_the_cpu_kernel():
    with qwen_fast.record_backends() as calls:
        qwen_fast.fused_topk(torch.randn(3, 4), torch.randn(3, 8), 2)
    assert calls == [("fused_topk", "cpu")]


def test_fused_topk_vllm_outputs():
    """vLLM's three outputs: ids as indices_type, token_expert_indices[t, j] = j * T + t (int32), and the routing
    itself the reference's; grouped_topk is the same routing with groups."""
    x, logits = torch.randn(5, 4), torch.randn(5, 8)
    weights, ids, rows = qwen_fast.fused_topk(x, logits, 3, True, torch.int64)
    expected_w, expected_ids = topk_routing(logits, 3, True)
    assert ids.dtype == torch.int64 and torch.equal(ids, expected_ids.long())
    assert_close(weights, expected_w)  # the cpu kernel's own exp and sum: within the fp32 tolerance
    assert rows.dtype == torch.int32 and rows.is_contiguous()
    assert rows.tolist() == [[j * 5 + t for j in range(3)] for t in range(5)]
    weights, ids = qwen_fast.grouped_topk(x, logits, 2, False, 4, 2, "sigmoid")
    expected_w, expected_ids = topk_routing(logits, 2, False, scoring_func="sigmoid", num_expert_group=4, topk_group=2)
    assert torch.equal(ids, expected_ids)
    assert_close(weights, expected_w)
    with pytest.raises(ValueError, match=r"num_expert_group must be in \[1, 8\], got 0"):
        qwen_fast.grouped_topk(x, logits, 2, False)  # vLLM's defaults (0 groups) cannot run


# --- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fused_topk_cuda_graph_and_deterministic():
    logits = ((torch.randn(512, 128) * 128).round() / 64).bfloat16().cuda()
    bias = torch.randn(128, device="cuda") / 8
    args = (logits, 8, True, "sigmoid", bias, 8, 4, 2.5, "top2_sum")
    first = torch.ops.qwen_fast.fused_topk(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.qwen_fast.fused_topk(*args)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(first, captured, strict=True):
            assert torch.equal(a, b)
