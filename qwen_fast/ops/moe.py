"""fused_experts (grouped SwiGLU experts with a weighted fp32 combine) and fused_moe (routing + experts)."""

import torch

from qwen_fast.reference import moe as reference

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, Require, check_shape, check_tensor, raise_unless, traced
from ._dispatch import INTERPRETER_DOT, Op
from ._library import define_triton_op, launcher, native_op
from .moe_align import MOE_ALIGN_BLOCK_SIZE, check_expert_ids
from .routing import FUSED_TOPK, check_routing_args


def _fake_fused_experts(hidden_states, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    check_experts_args(hidden_states, w13, w2, topk_weights, topk_ids, traced)
    return hidden_states.new_empty(hidden_states.shape)


_choose_config = launcher("moe_gemm", "choose_config")
_launch_experts = launcher("moe_gemm", "fused_experts")


def triton_fused_experts(hidden_states, w13, w2, topk_weights, topk_ids, config: dict | None = None) -> torch.Tensor:
    """The Triton fused_experts, composed here: the tiles (kernels/moe_gemm.py choose_config, or `config`, a tuner's
    candidate), the routing layout from moe_align_block_size's auto backend (its Op: arguments already checked),
    then the GEMM and combine kernels. Arguments as fused_experts."""
    num_tokens, topk = topk_ids.shape
    if num_tokens == 0:
        return hidden_states.new_empty(hidden_states.shape)
    config = _choose_config(num_tokens, topk, w13) if config is None else config
    layout = MOE_ALIGN_BLOCK_SIZE.auto(topk_ids.device, topk_ids, config["BLOCK_M"], w13.shape[0])
    return _launch_experts(hidden_states, w13, w2, topk_weights, *layout, config)


_fused_experts_triton = define_triton_op(
    "fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids) -> Tensor",
    triton_fused_experts,
    _fake_fused_experts,
)
_fused_experts_native = native_op("fused_experts", _fake_fused_experts)

# The experts' GEMMs are Triton's job on CUDA (no CUDA C++ kernel); on CPU the C++ extension's tiled kernels
# (csrc/cpu/moe.cpp).
FUSED_EXPERTS = Op(
    "fused_experts",
    {"triton": _fused_experts_triton, "cpu": _fused_experts_native, "torch": reference.fused_experts},
    {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    interpreter_limit=INTERPRETER_DOT,
)


def _fused_moe(hidden_states, w13, w2, gating_output, topk, renormalize=True, **routing_kwargs):
    """fused_moe on the kernels: routing on fused_topk's auto backend, then fused_experts on the backend this call
    was dispatched to (the forced one, or auto's, which is fused_experts' own choice). Arguments already checked."""
    weights, ids = FUSED_TOPK.auto(gating_output.device, gating_output, topk, renormalize, **routing_kwargs)
    return FUSED_EXPERTS(hidden_states.device, hidden_states, w13, w2, weights, ids)


# A forced backend names the experts' kernels, the bulk of the work; routing takes its fastest backend.
FUSED_MOE = Op(
    "fused_moe",
    {"triton": _fused_moe, "cpu": _fused_moe, "torch": reference.fused_moe},
    FUSED_EXPERTS.auto_order,
    native_op="fused_experts",
    interpreter_limit=INTERPRETER_DOT,
)


def check_expert_weights(hidden_states: object, w13: object, w2: object, require: Require = raise_unless) -> None:
    """hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], one dtype and device."""
    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=FLOAT_DTYPES, require=require)
    dtype, device = hidden_states.dtype, hidden_states.device
    check_tensor("w13", w13, ndim=3, dtypes=(dtype,), device=device, require=require)
    check_tensor("w2", w2, ndim=3, dtypes=(dtype,), device=device, require=require)
    num_experts, two_i, hidden = w13.shape
    require(
        hidden == hidden_states.shape[1],
        ValueError,
        lambda: (
            f"w13 [E, 2I, H] = {tuple(w13.shape)} must match hidden_states [T, H] = {tuple(hidden_states.shape)} in H"
        ),
    )
    require(
        (two_i % 2 == 0) & (two_i != 0),
        ValueError,
        lambda: f"w13 [E, 2I, H] must have an even, nonzero 2I (gate rows then up rows), got {tuple(w13.shape)}",
    )
    check_shape("w2", w2, (num_experts, hidden, two_i // 2), "[E, H, I] from w13 [E, 2I, H] =", require)


def check_experts_args(hidden_states, w13, w2, topk_weights, topk_ids, require: Require = raise_unless) -> None:
    """fused_experts' contract (the eager check and the fake; `require`: see _checks.py)."""
    check_expert_weights(hidden_states, w13, w2, require)
    device = hidden_states.device
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=device, require=require)
    check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, device=device, require=require)
    check_shape("topk_weights", topk_weights, topk_ids.shape, "[T, k] = topk_ids' shape", require)
    require(
        topk_ids.shape[0] == hidden_states.shape[0],
        ValueError,
        lambda: f"topk_ids [T, k] = {tuple(topk_ids.shape)} must have hidden_states' T = {hidden_states.shape[0]} rows",
    )
    require(
        topk_ids.shape[1] <= w13.shape[0],
        ValueError,
        lambda: f"topk_ids has k = {topk_ids.shape[1]} choices per token but there are only {w13.shape[0]} experts",
    )


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Each token through its k experts (SwiGLU), outputs weighted and summed in fp32 (vLLM's `fused_experts`).

    For e = topk_ids[t, j]: y = (silu(x @ w13[e, :I].T) * (x @ w13[e, I:].T)) @ w2[e].T, and
    out[t] = sum_j topk_weights[t, j] * y, accumulated in fp32 in a fixed order (deterministic). The weights are
    transformers 5.x's `gate_up_proj` and `down_proj`, read in place. Math: qwen_fast.reference.moe.

    Args:
        hidden_states: [T, H] float32/float16/bfloat16.
        w13: [E, 2I, H], hidden_states' dtype: gate rows, then up rows.
        w2: [E, H, I], hidden_states' dtype.
        topk_weights: [T, k] float (fp32 from fused_topk, or the model dtype).
        topk_ids: [T, k] int32/int64 expert ids in [0, E).

    Returns:
        [T, H] in hidden_states' dtype.

    Example:
        >>> x, w13, w2 = torch.randn(3, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4)
        >>> weights, ids = qwen_fast.fused_topk(torch.randn(3, 4), topk=2)
        >>> qwen_fast.fused_experts(x, w13, w2, weights, ids).shape
        torch.Size([3, 8])
    """
    check_experts_args(hidden_states, w13, w2, topk_weights, topk_ids)
    check_expert_ids("topk_ids", topk_ids, w13.shape[0])
    return FUSED_EXPERTS(hidden_states.device, hidden_states, w13, w2, topk_weights, topk_ids)


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool = True,
    **routing_kwargs,
) -> torch.Tensor:
    """A routed MoE layer in one call: fused_topk on `gating_output`, then fused_experts (no shared experts).

    Args:
        hidden_states: [T, H] float32/float16/bfloat16.
        w13: [E, 2I, H] and w2: [E, H, I], hidden_states' dtype (transformers' gate_up_proj and down_proj).
        gating_output: [T, E] float router logits.
        topk, renormalize, **routing_kwargs: as fused_topk (scoring_func, e_score_correction_bias,
            num_expert_group, topk_group, routed_scaling_factor).

    Returns:
        [T, H] in hidden_states' dtype.

    Example:
        >>> x, w13, w2 = torch.randn(3, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4)
        >>> qwen_fast.fused_moe(x, w13, w2, torch.randn(3, 4), topk=2).shape
        torch.Size([3, 8])
    """
    allowed = {"scoring_func", "e_score_correction_bias", "num_expert_group", "topk_group", "routed_scaling_factor"}
    unknown = sorted(set(routing_kwargs) - allowed)
    if unknown:
        raise TypeError(f"fused_moe got unknown routing arguments {unknown}; allowed: {sorted(allowed)}")
    routing = {
        "scoring_func": "softmax",
        "e_score_correction_bias": None,
        "num_expert_group": None,
        "topk_group": None,
        "routed_scaling_factor": 1.0,
    } | routing_kwargs
    check_expert_weights(hidden_states, w13, w2)
    check_routing_args(gating_output, topk, renormalize, **routing)
    check_tensor("gating_output", gating_output, device=hidden_states.device)
    check_shape("gating_output", gating_output, (hidden_states.shape[0], w13.shape[0]), "[T, E] =")
    return FUSED_MOE(hidden_states.device, hidden_states, w13, w2, gating_output, topk, renormalize, **routing_kwargs)
