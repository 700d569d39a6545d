"""fused_experts (grouped SwiGLU experts with a weighted fp32 combine) and fused_moe (routing + experts), in vLLM
v0.10.1.1's signatures (vllm/model_executor/layers/fused_moe/fused_moe.py)."""

import torch

from qwen_fast.reference import moe as reference
from qwen_fast.reference.quant import FP8, QUANTIZED_DTYPES

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, Require, check_int, check_shape, check_tensor, raise_unless, traced
from ._dispatch import INTERPRETER_DOT, InterpreterLimit, Op
from ._library import define_triton_op, launcher, native_op
from .moe_align import MOE_ALIGN_BLOCK_SIZE, check_expert_ids, check_expert_map
from .moe_quant import check_expert_scales
from .routing import FUSED_TOPK, check_routing_args


def _fake_fused_experts(
    hidden_states, w13, w2, topk_weights, topk_ids, expert_map=None, activation="silu", w13_scale=None,
    w2_scale=None, block_shape=None,
) -> torch.Tensor:  # fmt: skip
    check_experts_args(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape, traced)
    return hidden_states.new_empty(hidden_states.shape)


_choose_config = launcher("moe_gemm", "choose_config")
_launch_experts = launcher("moe_gemm", "fused_experts")


def triton_fused_experts(
    hidden_states, w13, w2, topk_weights, topk_ids, expert_map=None, activation="silu", w13_scale=None,
    w2_scale=None, block_shape=None, config: dict | None = None,
) -> torch.Tensor:  # fmt: skip
    """The Triton fused_experts, composed here: the tiles (kernels/moe_gemm.py choose_config, or `config`, a tuner's
    candidate), the routing layout from moe_align_block_size's op on the backend this call runs on (forced, or
    auto's), on the global ids with expert_map applied to expert_ids as vLLM does (a block of -1 is skipped), then
    the GEMM and combine kernels. Arguments as the FUSED_EXPERTS op (already checked)."""
    num_tokens, topk = topk_ids.shape
    if num_tokens == 0:
        return hidden_states.new_empty(hidden_states.shape)
    num_experts = w13.shape[0] if expert_map is None else expert_map.shape[0]
    config = _choose_config(num_tokens, topk, w13, num_experts) if config is None else config
    sorted_ids, expert_ids, post_padded = MOE_ALIGN_BLOCK_SIZE(
        topk_ids.device, topk_ids, config["BLOCK_M"], num_experts
    )
    if expert_map is not None:
        expert_ids = expert_map[expert_ids.long()].to(torch.int32)
    return _launch_experts(
        hidden_states, w13, w2, topk_weights, sorted_ids, expert_ids, post_padded, config, expert_map is not None,
        activation, w13_scale, w2_scale, block_shape,
    )  # fmt: skip


_fused_experts_triton = define_triton_op(
    "fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
    'Tensor? expert_map=None, str activation="silu", Tensor? w13_scale=None, Tensor? w2_scale=None, '
    "int[]? block_shape=None) -> Tensor",
    triton_fused_experts,
    _fake_fused_experts,
)
_fused_experts_native = native_op("fused_experts", _fake_fused_experts)


# The interpreter reads fp8 weights right (tl.load, the cast to fp32 and fp8 tl.dot are exact there; int8 is not a
# floating-point argument): only bf16 stays refused, as for every tl.dot kernel.
INTERPRETER_QUANTIZED_DOT = InterpreterLimit((*INTERPRETER_DOT.dtypes, FP8), INTERPRETER_DOT.reason)

# The experts' GEMMs are Triton's job on CUDA (no CUDA C++ kernel); on CPU the C++ extension's tiled kernels
# (csrc/cpu/moe.cpp). The op's arguments: (hidden_states, w13, w2, topk_weights, topk_ids, expert_map=None,
# activation="silu", w13_scale=None, w2_scale=None, block_shape=None).
FUSED_EXPERTS = Op(
    "fused_experts",
    {"triton": _fused_experts_triton, "cpu": _fused_experts_native, "torch": reference.experts},
    {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    interpreter_limit=INTERPRETER_QUANTIZED_DOT,
)


def _run_experts(hidden_states, w13, w2, topk_weights, topk_ids, options: dict, apply_router_weight_on_input=False):
    """fused_experts' options (inplace, expert_map, activation, quant: (w13_scale, w2_scale, block_shape)) around
    the FUSED_EXPERTS op (arguments checked)."""
    x, weights = hidden_states, topk_weights
    if apply_router_weight_on_input:
        x, weights = reference.weigh_input(hidden_states, topk_weights)
    expert_map, activation = options["expert_map"], options["activation"]
    out = FUSED_EXPERTS(hidden_states.device, x, w13, w2, weights, topk_ids, expert_map, activation, *options["quant"])
    return hidden_states.copy_(out) if options["inplace"] else out


def _fused_moe(hidden_states, w13, w2, gating_output, topk, renormalize, options: dict, routing: dict):
    """fused_moe on the backend this call runs on: routing (fused_topk's op, or the custom function), then the
    experts; a forced backend runs both ops. Arguments already checked."""
    custom = options["custom_routing_function"]
    if custom is not None:
        weights, ids = custom(hidden_states, gating_output, topk, renormalize)
    else:
        weights, ids = FUSED_TOPK(gating_output.device, gating_output, topk, renormalize, **routing)
    return _run_experts(hidden_states, w13, w2, weights, ids, options)


# Every backend runs the same composition: a forced backend names the backend of each inner op.
FUSED_MOE = Op(
    "fused_moe",
    {"triton": _fused_moe, "cpu": _fused_moe, "torch": _fused_moe},
    FUSED_EXPERTS.auto_order,
    native_op="fused_experts",
    interpreter_limit=INTERPRETER_DOT,
)


def check_expert_weights(
    hidden_states: object, w13: object, w2: object, w13_scale: object = None, w2_scale: object = None,
    block_shape: object = None, require: Require = raise_unless,
) -> None:  # fmt: skip
    """hidden [T, H], w1 [E, 2I, H], w2 [E, H, I] on one device, the weights in hidden's dtype or quantized (fp8,
    int8: both the same) with their scales (moe_quant.check_expert_scales)."""
    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=FLOAT_DTYPES, require=require)
    dtype, device = hidden_states.dtype, hidden_states.device
    check_tensor("w1", w13, ndim=3, dtypes=(dtype, *QUANTIZED_DTYPES), device=device, require=require)
    check_tensor("w2", w2, ndim=3, dtypes=(w13.dtype,), device=device, require=require)
    num_experts, two_i, hidden = w13.shape
    require(
        hidden == hidden_states.shape[1],
        ValueError,
        lambda: (
            f"w1 [E, 2I, H] = {tuple(w13.shape)} must match hidden_states [T, H] = {tuple(hidden_states.shape)} in H"
        ),
    )
    require(
        (two_i % 2 == 0) & (two_i != 0),
        ValueError,
        lambda: f"w1 [E, 2I, H] must have an even, nonzero 2I (gate rows then up rows), got {tuple(w13.shape)}",
    )
    check_shape("w2", w2, (num_experts, hidden, two_i // 2), "[E, H, I] from w1 [E, 2I, H] =", require)
    check_expert_scales(w13, w2, w13_scale, w2_scale, block_shape, require)


def check_experts_args(
    hidden_states, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None, block_shape=None,
    require: Require = raise_unless,
) -> None:  # fmt: skip
    """fused_experts' tensor contract (the eager check and the fake; `require`: see _checks.py)."""
    check_expert_weights(hidden_states, w13, w2, w13_scale, w2_scale, block_shape, require)
    device = hidden_states.device
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=device, require=require)
    check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, device=device, require=require)
    check_shape("topk_weights", topk_weights, topk_ids.shape, "[T, k] = topk_ids' shape", require)
    require(
        topk_ids.shape[0] == hidden_states.shape[0],
        ValueError,
        lambda: f"topk_ids [T, k] = {tuple(topk_ids.shape)} must have hidden_states' T = {hidden_states.shape[0]} rows",
    )


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _check_options(hidden_states, w1, topk, inplace, apply_router_weight_on_input, global_num_experts, expert_map,
                   arguments: dict) -> int:  # fmt: skip
    """vLLM's options of fused_experts / fused_moe (`arguments`: the call's locals(), for the unsupported ones);
    returns the global expert count (ids lie in [0, it))."""
    reference.check_unsupported(arguments)
    for name, value in (("inplace", inplace), ("apply_router_weight_on_input", apply_router_weight_on_input)):
        _check_bool(name, value)
    if apply_router_weight_on_input and topk != 1:
        raise ValueError(
            f"apply_router_weight_on_input=True needs topk == 1 (vLLM implements only that), got k = {topk}"
        )
    if inplace and hidden_states.requires_grad:
        raise ValueError("inplace=True writes into hidden_states, which requires grad: pass inplace=False")
    check_int("global_num_experts", global_num_experts, low=-1)
    if expert_map is None:
        if global_num_experts not in (-1, w1.shape[0]):
            raise ValueError(
                f"global_num_experts={global_num_experts} differs from w1's E = {w1.shape[0]} without an expert_map"
            )
        return w1.shape[0]
    global_e = expert_map.shape[0] if isinstance(expert_map, torch.Tensor) else 0
    num_experts = global_e if global_num_experts == -1 else global_num_experts
    check_expert_map(expert_map, num_experts, hidden_states.device, w1.shape[0])
    return num_experts


def fused_experts(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    inplace: bool = False,
    activation: str = "silu",
    is_act_and_mul: bool = True,
    apply_router_weight_on_input: bool = False,
    use_fp8_w8a8: bool = False,
    use_int8_w8a8: bool = False,
    use_int8_w8a16: bool = False,
    use_int4_w4a16: bool = False,
    use_mxfp4_w4a4: bool = False,
    per_channel_quant: bool = False,
    global_num_experts: int = -1,
    expert_map: torch.Tensor | None = None,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w1_zp: torch.Tensor | None = None,
    w2_zp: torch.Tensor | None = None,
    a1_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    block_shape: list[int] | None = None,
    allow_deep_gemm: bool = False,
    allow_cutlass_block_scaled_grouped_gemm: bool = False,
    w1_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each token through its k experts (SwiGLU), outputs weighted and summed in fp32: vLLM's `fused_experts`
    (v0.10.1.1 signature).

    For e = topk_ids[t, j]: y = (silu(x @ w1[e, :I].T) * (x @ w1[e, I:].T)) @ w2[e].T, and
    out[t] = sum_j topk_weights[t, j] * y, accumulated in fp32 in a fixed order (deterministic). The weights are
    transformers 5.x's `gate_up_proj` and `down_proj`, read in place. Math: qwen_fast.reference.moe.

    Quantized experts (formats: qwen_fast.reference.quant), computed with activations in hidden_states' dtype
    (w8a16: the kernels dequantize the weights in registers, never into memory):
    - use_fp8_w8a8=True: w1, w2 float8_e4m3fn, block_shape [bn, bk] (e.g. [128, 128], as Qwen3-*-FP8 and
      DeepSeek-V3 checkpoints), w1_scale fp32 [E, ceil(2I/bn), ceil(H/bk)], w2_scale fp32 [E, ceil(H/bn),
      ceil(I/bk)]: W = w * scale per block (transformers' `*_scale_inv`). Unlike vLLM, x is not quantized to fp8.
    - use_int8_w8a16=True: w1, w2 int8, w1_scale fp32 [E, 2I], w2_scale fp32 [E, H] (per output channel,
      symmetric), block_shape None.
    qwen_fast.quantize_fp8 / quantize_int8 make both from float weights.

    Args:
        hidden_states: [T, H] float32/float16/bfloat16.
        w1: [E, 2I, H], hidden_states' dtype (or float8_e4m3fn / int8, quantized): gate rows, then up rows (this
            rank's experts under expert_map).
        w2: [E, H, I], w1's dtype.
        topk_weights: [T, k] float (fp32 from fused_topk, or the model dtype).
        topk_ids: [T, k] int32/int64 expert ids in [0, E), or global ids in [0, global_num_experts) with expert_map.
        inplace: write the output into hidden_states and return it.
        activation: "silu" (SwiGLU) or "gelu" (GeGLU, the exact erf GELU, as vLLM's gelu_and_mul); is_act_and_mul
            True (gated); anything else is refused (ValueError).
        apply_router_weight_on_input: multiply x by its routing weight (in x's dtype) before the experts and
            combine with weight 1; needs k == 1, as vLLM.
        global_num_experts: -1 (expert_map's length, or E without one) or the global expert count.
        expert_map: [global_num_experts] int32 or None (expert parallelism): global id -> local index into w1/w2,
            or -1 for another rank's expert; such a route costs no work and contributes 0.
        use_fp8_w8a8, use_int8_w8a16, w1_scale, w2_scale, block_shape: quantized weights (above).
        use_int8_w8a8, use_int4_w4a16, use_mxfp4_w4a4, per_channel_quant, w*_zp, a*_scale, w1_bias, w2_bias:
            refused unless unset (those quantization modes and expert biases are not supported).
            allow_deep_gemm and allow_cutlass_block_scaled_grouped_gemm pick vLLM's own fp8 kernels; they change
            nothing here.

    Returns:
        [T, H] in hidden_states' dtype (hidden_states itself when inplace).

    Example:
        >>> x, w1, w2 = torch.randn(3, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4)
        >>> weights, ids, _ = qwen_fast.fused_topk(x, torch.randn(3, 4), topk=2, renormalize=True)
        >>> qwen_fast.fused_experts(x, w1, w2, weights, ids).shape
        torch.Size([3, 8])
        >>> (q1, s1), (q2, s2) = qwen_fast.quantize_fp8(w1, [4, 4]), qwen_fast.quantize_fp8(w2, [4, 4])
        >>> qwen_fast.fused_experts(x, q1, q2, weights, ids, use_fp8_w8a8=True, w1_scale=s1, w2_scale=s2,
        ...                         block_shape=[4, 4]).shape
        torch.Size([3, 8])
    """
    reference.check_quantization(locals())
    check_experts_args(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, block_shape)
    num_experts = _check_options(
        hidden_states, w1, topk_ids.shape[1], inplace, apply_router_weight_on_input, global_num_experts, expert_map,
        locals(),
    )  # fmt: skip
    check_expert_ids("topk_ids", topk_ids, num_experts)
    quant = (w1_scale, w2_scale, block_shape)
    options = {"inplace": inplace, "expert_map": expert_map, "activation": activation, "quant": quant}
    return _run_experts(hidden_states, w1, w2, topk_weights, topk_ids, options, apply_router_weight_on_input)


def fused_moe(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool = True,
    inplace: bool = False,
    activation: str = "silu",
    is_act_and_mul: bool = True,
    use_grouped_topk: bool = False,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    custom_routing_function=None,
    use_fp8_w8a8: bool = False,
    use_int8_w8a8: bool = False,
    use_int8_w8a16: bool = False,
    use_int4_w4a16: bool = False,
    use_mxfp4_w4a4: bool = False,
    per_channel_quant: bool = False,
    global_num_experts: int = -1,
    expert_map: torch.Tensor | None = None,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w1_zp: torch.Tensor | None = None,
    w2_zp: torch.Tensor | None = None,
    a1_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    block_shape: list[int] | None = None,
    w1_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    *,
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    group_scoring: str | None = None,
) -> torch.Tensor:
    """A routed MoE layer in one call: vLLM's `fused_moe` (v0.10.1.1 signature): fused_topk on `gating_output`
    (group-limited with use_grouped_topk, or `custom_routing_function`), then fused_experts (no shared experts).

    Backends: a forced backend (use_backend / QWEN_FAST_BACKEND) runs every inner op on that backend (fused_topk,
    moe_align_block_size and fused_experts: the triton backend has a twin of every small op); auto picks each
    inner op's own fastest backend.

    Args:
        hidden_states: [T, H] float32/float16/bfloat16.
        w1: [E, 2I, H] and w2: [E, H, I], hidden_states' dtype (transformers' gate_up_proj and down_proj), or
            quantized (float8_e4m3fn with use_fp8_w8a8, int8 with use_int8_w8a16: see fused_experts).
        gating_output: [T, global E] float router logits.
        topk, renormalize: as fused_topk.
        inplace, activation, is_act_and_mul, global_num_experts, expert_map, the quantization arguments
            (use_fp8_w8a8, use_int8_w8a16, w1_scale, w2_scale, block_shape; the others refused), w1_bias, w2_bias:
            as fused_experts.
        use_grouped_topk, num_expert_group, topk_group: group-limited top-k (vLLM's grouped_topk: softmax, groups
            scored by `group_scoring`); num_expert_group without use_grouped_topk is refused (vLLM ignores it).
        custom_routing_function: None, or f(hidden_states, gating_output, topk, renormalize) -> (weights, ids).
        scoring_func, e_score_correction_bias, routed_scaling_factor, group_scoring (keyword-only, qwen_fast's):
            as fused_topk.

    Returns:
        [T, H] in hidden_states' dtype (hidden_states itself when inplace).

    Example:
        >>> x, w1, w2 = torch.randn(3, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4)
        >>> qwen_fast.fused_moe(x, w1, w2, torch.randn(3, 4), topk=2, renormalize=True).shape
        torch.Size([3, 8])
    """
    reference.check_quantization(locals())
    check_expert_weights(hidden_states, w1, w2, w1_scale, w2_scale, block_shape)
    _check_bool("use_grouped_topk", use_grouped_topk)
    if not use_grouped_topk and (num_expert_group is not None or topk_group is not None):
        raise ValueError(
            f"num_expert_group={num_expert_group!r} and topk_group={topk_group!r} need use_grouped_topk=True "
            "(vLLM's fused_moe would ignore them)"
        )
    if use_grouped_topk and (num_expert_group is None or topk_group is None):
        raise ValueError("use_grouped_topk=True needs num_expert_group and topk_group")
    if custom_routing_function is not None and not callable(custom_routing_function):
        raise TypeError(f"custom_routing_function must be callable, got {type(custom_routing_function).__name__}")
    num_experts = _check_options(
        hidden_states, w1, topk, inplace, False, global_num_experts, expert_map,
        locals(),
    )  # fmt: skip
    routing = {
        "scoring_func": scoring_func,
        "e_score_correction_bias": e_score_correction_bias,
        "num_expert_group": num_expert_group,
        "topk_group": topk_group,
        "routed_scaling_factor": routed_scaling_factor,
        "group_scoring": group_scoring,
    }
    check_routing_args(gating_output, topk, renormalize, **routing)
    check_tensor("gating_output", gating_output, device=hidden_states.device)
    check_shape("gating_output", gating_output, (hidden_states.shape[0], num_experts), "[T, global E] =")
    options = {"custom_routing_function": custom_routing_function, "inplace": inplace, "expert_map": expert_map,
               "activation": activation, "quant": (w1_scale, w2_scale, block_shape)}  # fmt: skip
    return FUSED_MOE(hidden_states.device, hidden_states, w1, w2, gating_output, topk, renormalize, options, routing)
