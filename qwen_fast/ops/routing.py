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
) -> tuple[torch.Tensor, torch.Tensor]:
    check_routing_args(
        gating_output, topk, renormalize, scoring_func, e_score_correction_bias, num_expert_group, topk_group,
        routed_scaling_factor, require=traced,
    )  # fmt: skip
    new = gating_output.new_empty
    return new((gating_output.shape[0], topk), dtype=torch.float32), new(
        (gating_output.shape[0], topk), dtype=torch.int32
    )


_fused_topk_triton = define_triton_op(
    "fused_topk(Tensor gating_output, int topk, bool renormalize, str scoring_func, Tensor? e_score_correction_bias, "
    "int? num_expert_group, int? topk_group, float routed_scaling_factor) -> (Tensor, Tensor)",
    launcher("routing", "fused_topk"),
    _fake_fused_topk,
)
_fused_topk_native = native_op("fused_topk", _fake_fused_topk)


def _positional(impl):
    """The backends take fused_topk's keyword-only arguments positionally, as the op schema does."""

    def run(gating_output, topk, renormalize=True, *, scoring_func="softmax", e_score_correction_bias=None,
            num_expert_group=None, topk_group=None, routed_scaling_factor=1.0):  # fmt: skip
        return impl(
            gating_output, topk, renormalize, scoring_func, e_score_correction_bias, num_expert_group, topk_group,
            float(routed_scaling_factor),
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
        "torch": reference.fused_topk,
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
    require: Require = raise_unless,
) -> None:
    """fused_topk's contract (shared with fused_moe and the fake; `require`: see _checks.py)."""
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


def fused_topk(
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool = True,
    *,
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `topk` experts per token from router logits and weigh them (vLLM's `fused_topk` / `grouped_topk`).

    Scores are softmax (or sigmoid) over all E experts in fp32; `e_score_correction_bias` is added for selection
    only; with `num_expert_group`, only the best `topk_group` groups (group score = sum of its top-2 selection
    scores) are eligible; ties go to the lower expert index; weights come from the unbiased scores, renormalized
    to sum 1 in fp32 if `renormalize`, then multiplied by `routed_scaling_factor`. Math: qwen_fast.reference.routing.

    Backends: cuda (a warp per token), triton, cpu (parallel over tokens), torch (the reference). The kernels select
    on their own fp32 scores with the same tie rule, so ids match the reference exactly except between experts whose
    scores are within a few fp32 ulps (their exp and summation order are their own). The kernels take E <= 1024;
    `auto` routes more experts to the torch backend, and forcing a kernel backend past the limit is a RuntimeError.

    Args:
        gating_output: [T, E] float32/float16/bfloat16 router logits (E <= 1024 for the kernels).
        topk: k, 1 <= k <= E.
        renormalize: divide the k weights by their sum (Qwen3 `norm_topk_prob`; Mixtral always).
        scoring_func: "softmax" or "sigmoid" (DeepSeek-V3).
        e_score_correction_bias: [E] float or None (DeepSeek-V3 selection bias).
        num_expert_group, topk_group: group-limited top-k (both or neither); E % num_expert_group == 0.
        routed_scaling_factor: multiplies the final weights.

    Returns:
        topk_weights: [T, k] float32, topk_ids: [T, k] int32, in descending order of selection score.

    Example:
        >>> weights, ids = qwen_fast.fused_topk(torch.randn(4, 128), topk=8)
        >>> weights.dtype, ids.dtype, tuple(ids.shape)
        (torch.float32, torch.int32, (4, 8))
    """
    check_routing_args(
        gating_output,
        topk,
        renormalize,
        scoring_func,
        e_score_correction_bias,
        num_expert_group,
        topk_group,
        routed_scaling_factor,
    )
    return FUSED_TOPK(
        gating_output.device,
        gating_output,
        topk,
        renormalize,
        scoring_func=scoring_func,
        e_score_correction_bias=e_score_correction_bias,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
    )
