"""fused_topk: top-k expert routing from router logits (softmax, or sigmoid + bias + group-limited top-k).

Backends: cuda (csrc/cuda/routing.cu, a warp per token), triton (kernels/routing.py, a program per block of tokens), cpu
(csrc/cpu/routing.cpp, parallel over tokens), torch (the reference). The kernels take E <= 1024 experts.
"""

import math

import torch

from qwen_fast.reference import routing as reference

from ._checks import FLOAT_DTYPES, Require, check_int, check_shape, check_tensor, raise_unless, traced
from ._dispatch import NATIVE_FIRST, Op
from ._library import define_triton_op, launcher, native_op


def _fake_fused_topk(
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    scoring_func: str,
    e_score_correction_bias: torch.Tensor | None,
    num_expert_group: int | None,
    topk_group: int | None,
    routed_scaling_factor: float,
    group_scoring: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_routing_args(
        gating_output, topk, renormalize, scoring_func, e_score_correction_bias, num_expert_group, topk_group,
        routed_scaling_factor, group_scoring, require=traced,
    )  # fmt: skip
    new = gating_output.new_empty
    return new((gating_output.shape[0], topk), dtype=torch.float32), new(
        (gating_output.shape[0], topk), dtype=torch.int32
    )


_fused_topk_triton = define_triton_op(
    "fused_topk(Tensor gating_output, int topk, bool renormalize, str scoring_func, Tensor? e_score_correction_bias, "
    "int? num_expert_group, int? topk_group, float routed_scaling_factor, str group_scoring) -> (Tensor, Tensor)",
    launcher("routing", "fused_topk"),
    _fake_fused_topk,
)
_fused_topk_native = native_op("fused_topk", _fake_fused_topk)


def _positional(impl):
    """The backends take the routing's keyword-only arguments positionally, as the op schema does, with
    group_scoring resolved (reference.routing.resolve_group_scoring)."""

    def run(gating_output, topk, renormalize=True, *, scoring_func="softmax", e_score_correction_bias=None,
            num_expert_group=None, topk_group=None, routed_scaling_factor=1.0, group_scoring=None):  # fmt: skip
        return impl(
            gating_output, topk, renormalize, scoring_func, e_score_correction_bias, num_expert_group, topk_group,
            float(routed_scaling_factor), reference.resolve_group_scoring(group_scoring, e_score_correction_bias),
        )  # fmt: skip

    return run


# The cuda, triton and cpu kernels take E <= KERNEL_MAX_EXPERTS (kernels/routing.py, csrc/routing_checks.h).
KERNEL_MAX_EXPERTS = 1024


def _kernel_limit(gating_output: torch.Tensor, *args, **kwargs) -> str | None:
    num_experts = gating_output.shape[1]
    if num_experts <= KERNEL_MAX_EXPERTS:
        return None
    return f"the kernels take 1 to {KERNEL_MAX_EXPERTS} experts, got E = {num_experts}"


FUSED_TOPK = Op(
    "fused_topk",
    {
        "cuda": _positional(_fused_topk_native),
        "triton": _positional(_fused_topk_triton),
        "cpu": _positional(_fused_topk_native),
        "torch": reference.topk_routing,
    },
    NATIVE_FIRST,
    kernel_limit=_kernel_limit,
)


def check_routing_args(
    gating_output: object,
    topk: object,
    renormalize: object,
    scoring_func: object,
    e_score_correction_bias: object,
    num_expert_group: object,
    topk_group: object,
    routed_scaling_factor: object,
    group_scoring: object = None,
    require: Require = raise_unless,
) -> None:
    """The routing's contract (fused_topk's, shared with fused_moe and the fake; `require`: see _checks.py)."""
    check_tensor("gating_output", gating_output, ndim=2, dtypes=FLOAT_DTYPES, require=require)
    num_experts = gating_output.shape[1]
    require(
        num_experts != 0,
        ValueError,
        lambda: f"gating_output must have at least one expert column, got shape {tuple(gating_output.shape)}",
    )
    check_int("topk", topk, low=1, high=num_experts, require=require)
    require(
        isinstance(renormalize, bool),
        TypeError,
        lambda: f"renormalize must be a bool, got {type(renormalize).__name__} {renormalize!r}",
    )
    require(
        scoring_func in ("softmax", "sigmoid"),
        ValueError,
        lambda: f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}",
    )
    if e_score_correction_bias is not None:
        check_tensor(
            "e_score_correction_bias", e_score_correction_bias, ndim=1, dtypes=FLOAT_DTYPES,
            device=gating_output.device, require=require,
        )  # fmt: skip
        check_shape("e_score_correction_bias", e_score_correction_bias, (num_experts,), "[E] with E =", require)
    require(
        (num_expert_group is None) == (topk_group is None),
        ValueError,
        lambda: (
            f"num_expert_group and topk_group go together, got num_expert_group={num_expert_group!r}, "
            f"topk_group={topk_group!r}"
        ),
    )
    if num_expert_group is not None:
        check_int("num_expert_group", num_expert_group, low=1, high=num_experts, require=require)
        require(
            num_experts % num_expert_group == 0,
            ValueError,
            lambda: f"num_expert_group={num_expert_group} must divide the number of experts {num_experts}",
        )
        check_int("topk_group", topk_group, low=1, high=num_expert_group, require=require)
        group_size = num_experts // num_expert_group
        require(
            topk <= topk_group * group_size,
            ValueError,
            lambda: (
                f"topk={topk} exceeds the {topk_group * group_size} experts of topk_group={topk_group} groups of "
                f"{group_size}"
            ),
        )
    require(
        not isinstance(routed_scaling_factor, bool) and isinstance(routed_scaling_factor, (int, float)),
        TypeError,
        lambda: f"routed_scaling_factor must be a float, got {type(routed_scaling_factor).__name__}",
    )
    require(
        math.isfinite(routed_scaling_factor) and routed_scaling_factor > 0,
        ValueError,
        lambda: f"routed_scaling_factor must be finite and > 0, got {routed_scaling_factor}",
    )
    require(
        group_scoring is None or group_scoring in reference.GROUP_SCORINGS,
        ValueError,
        lambda: f"group_scoring must be None, 'max' or 'top2_sum', got {group_scoring!r}",
    )


def check_hidden_rows(hidden_states: object, gating_output: torch.Tensor) -> None:
    """hidden_states [T, H] float on gating_output's device, with gating_output's T rows (vLLM reads only T)."""
    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=FLOAT_DTYPES, device=gating_output.device)
    if hidden_states.shape[0] != gating_output.shape[0]:
        raise ValueError(
            f"hidden_states [T, H] = {tuple(hidden_states.shape)} and gating_output [T, E] = "
            f"{tuple(gating_output.shape)} must have the same number of tokens T"
        )


def fused_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool = True,
    indices_type: torch.dtype | None = None,
    *,
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    group_scoring: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick `topk` experts per token from router logits and weigh them: vLLM's `fused_topk` (v0.10.1.1 signature and
    outputs), with vLLM's `grouped_topk` routing options as keyword-only extras.

    Scores are softmax (or sigmoid) over all E experts in fp32; `e_score_correction_bias` is added for selection
    only; with `num_expert_group`, only the best `topk_group` groups are eligible, a group scored by
    `group_scoring`: "max" (its largest selection score: DeepSeek-V2, vLLM's grouped_topk without a bias) or
    "top2_sum" (the sum of its two largest: DeepSeek-V3, vLLM with a bias); None (default) is vLLM's rule, "top2_sum"
    with a bias and "max" without. Ties go to the lower expert index; weights come from the unbiased scores,
    renormalized to sum 1 in fp32 if `renormalize`, then multiplied by `routed_scaling_factor`. Math:
    qwen_fast.reference.routing.

    Backends: cuda (a warp per token), triton, cpu (parallel over tokens), torch (the reference). The kernels select
    on their own fp32 scores with the same tie rule, so ids match the reference exactly except between experts whose
    scores are within a few fp32 ulps (their exp and summation order are their own). The kernels take E <= 1024;
    `auto` routes more experts to the torch backend, and forcing a kernel backend past the limit is a RuntimeError.

    Args:
        hidden_states: [T, H] float, the layer's input: only its T is read (vLLM checks it against gating_output).
        gating_output: [T, E] float32/float16/bfloat16 router logits (E <= 1024 for the kernels).
        topk: k, 1 <= k <= E.
        renormalize: divide the k weights by their sum (Qwen3 `norm_topk_prob`; Mixtral always). vLLM requires it;
            here it defaults to True.
        indices_type: dtype of topk_ids, torch.int32 (None) or torch.int64.
        scoring_func: "softmax" or "sigmoid" (DeepSeek-V3).
        e_score_correction_bias: [E] float or None (DeepSeek-V3 selection bias).
        num_expert_group, topk_group: group-limited top-k (both or neither); E % num_expert_group == 0.
        routed_scaling_factor: multiplies the final weights.
        group_scoring: "max", "top2_sum" or None (vLLM's rule), see above.

    Returns:
        topk_weights: [T, k] float32, topk_ids: [T, k] indices_type, in descending order of selection score, and
        token_expert_indices: [T, k] int32 with [t, j] = j * T + t (what vLLM's topk_softmax kernel writes there).

    Example:
        >>> x = torch.randn(4, 64)
        >>> weights, ids, rows = qwen_fast.fused_topk(x, torch.randn(4, 128), topk=8, renormalize=True)
        >>> weights.dtype, ids.dtype, tuple(ids.shape), rows[1].tolist()[:3]
        (torch.float32, torch.int32, (4, 8), [1, 5, 9])
    """
    check_routing_args(
        gating_output, topk, renormalize, scoring_func, e_score_correction_bias, num_expert_group, topk_group,
        routed_scaling_factor, group_scoring,
    )  # fmt: skip
    check_hidden_rows(hidden_states, gating_output)
    if indices_type not in (None, torch.int32, torch.int64):
        raise TypeError(f"indices_type must be None, torch.int32 or torch.int64, got {indices_type!r}")
    weights, ids = FUSED_TOPK(
        gating_output.device,
        gating_output,
        topk,
        renormalize,
        scoring_func=scoring_func,
        e_score_correction_bias=e_score_correction_bias,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
        group_scoring=group_scoring,
    )
    ids = ids if indices_type in (None, torch.int32) else ids.to(indices_type)
    return weights, ids, reference.token_expert_indices(gating_output.shape[0], topk, gating_output.device)


def grouped_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    num_expert_group: int = 0,
    topk_group: int = 0,
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    *,
    routed_scaling_factor: float = 1.0,
    group_scoring: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k (DeepSeek-V2/V3): vLLM's `grouped_topk` (v0.10.1.1 signature), the same routing as
    fused_topk with num_expert_group and topk_group (both >= 1: vLLM's default 0 is refused, it cannot run). Groups
    are scored by vLLM's rule (group_scoring None: the sum of the top-2 with e_score_correction_bias, the maximum
    without) or as `group_scoring` says; routed_scaling_factor (keyword-only, qwen_fast's) multiplies the weights.

    Args:
        hidden_states: [T, H] float (only its T is read); gating_output: [T, E] float router logits.
        topk, renormalize, scoring_func, e_score_correction_bias, group_scoring: as fused_topk.
        num_expert_group: G, dividing E; topk_group: the groups kept, 1 <= topk_group <= G.

    Returns:
        topk_weights: [T, k] float32, topk_ids: [T, k] int32, in descending order of selection score (vLLM leaves
        the order unspecified).

    Example:
        >>> weights, ids = qwen_fast.grouped_topk(torch.zeros(2, 16), torch.randn(2, 64), 4, True, 8, 2)
        >>> tuple(ids.shape), weights.dtype
        ((2, 4), torch.float32)
    """
    weights, ids, _ = fused_topk(
        hidden_states, gating_output, topk, renormalize, scoring_func=scoring_func,
        e_score_correction_bias=e_score_correction_bias, num_expert_group=num_expert_group, topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor, group_scoring=group_scoring,
    )  # fmt: skip
    return weights, ids
