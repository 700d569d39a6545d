"""Reference MoE experts (SwiGLU) and the full routed MoE layer, in transformers 5.x's weight layout.

Weights, read in place (never copied or transposed into new tensors):

    w13 = gate_up_proj [E, 2I, H]     w13[e, :I] is expert e's gate projection, w13[e, I:] its up projection
    w2  = down_proj    [E, H, I]

Each token t is routed to the k experts topk_ids[t, j] with weights topk_weights[t, j]. For each pair (t, j) with
e = topk_ids[t, j] and x = hidden_states[t]:

    gate, up = x @ w13[e, :I].T,  x @ w13[e, I:].T       one GEMM x @ w13[e].T, split in halves   [I]
    act      = silu(gate) * up           (activation "gelu": gelu(gate) * up, the exact GELU)             [I]
    y[t, j]  = act @ w2[e].T                                                                         [H]

    out[t]   = sum_{j = 0 .. k-1} float(topk_weights[t, j]) * float(y[t, j])       accumulated in fp32, j ascending
    output   = out.to(hidden_states.dtype)

Numerics. The expert GEMMs and the activation run in the weights' dtype, exactly as transformers' eager experts do
(F.linear with fp32 accumulation inside, one rounding of each GEMM, of silu and of the product to that dtype), so
y[t, j] is what transformers computes. The combine differs on purpose: transformers multiplies y by the weight in the
promoted dtype (bf16 x bf16 for Qwen3, whose router casts the weights to the model dtype; fp32 for Mixtral) and
index_adds into an output of the model dtype, rounding once per expert; this reference multiplies and sums in fp32
and rounds once. The k terms are added in a fixed order (j = 0, 1, ..., k-1) into a zero fp32 accumulator, so the
result is deterministic (no atomics) and fully specified (each term: an fp32 product, then an fp32 add; a kernel
that fuses them into an FMA differs in the last bit, which the fp32 tolerance absorbs).

Quantized weights (qwen_fast.reference.quant states the formats): w13 and w2 float8_e4m3fn with block scales, or
int8 with per-output-channel scales. Each expert's weights are dequantized in fp32 and rounded once to
hidden_states' dtype (transformers' CPU result for an FP8 checkpoint), then the math above runs in that dtype.

vLLM's options (v0.10.1.1's fused_experts; its other quantization modes are refused, see check_unsupported):
    expert_map [global_E] int32: topk_ids are global ids; expert_map[e] is e's local id (its index in w13/w2) or -1
        for an expert of another rank: such a pair costs no work and its y is 0.
    apply_router_weight_on_input (topk == 1, as vLLM's prepare step requires): x is multiplied by the routing
        weight in its own dtype before the experts, and the combine weight is 1.
    inplace: the output is written into hidden_states, which is returned.

fused_moe = fused_topk (qwen_fast.reference.routing) followed by fused_experts.
"""

import torch
import torch.nn.functional as F

from qwen_fast.reference.quant import FP8, QUANTIZED_DTYPES, dequantize
from qwen_fast.reference.routing import topk_routing

# vLLM's quantization modes qwen_fast does not implement (it does fp8 block-scaled and int8 per-channel weights).
QUANTIZATION_FLAGS = ("use_int8_w8a8", "use_int4_w4a16", "use_mxfp4_w4a4", "per_channel_quant")
QUANTIZATION_TENSORS = ("w1_zp", "w2_zp", "a1_scale", "a2_scale")


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}  # gated: act(gate) * up; gelu is the exact (erf) GELU, as vLLM's
UNSUPPORTED = ("activation", "is_act_and_mul", *QUANTIZATION_FLAGS, *QUANTIZATION_TENSORS, "w1_bias", "w2_bias")


def check_unsupported(arguments: dict) -> None:
    """vLLM arguments qwen_fast does not implement, read by name (UNSUPPORTED) from a call's `arguments` (its
    locals()): refused unless they hold their defaults, with a ValueError naming them. activation "silu" or "gelu"
    and is_act_and_mul True (gated), the quantization flags False, the quantization tensors, block_shape and the
    biases None."""
    if arguments["activation"] not in ACTIVATIONS:
        raise ValueError(
            f"activation {arguments['activation']!r} is not supported: the experts are gated 'silu' or 'gelu'"
        )
    if arguments["is_act_and_mul"] is not True:
        raise ValueError(
            f"is_act_and_mul={arguments['is_act_and_mul']!r} is not supported: the experts are gated (act(gate) * up)"
        )
    for name in QUANTIZATION_FLAGS:
        if arguments[name] is not False:
            raise ValueError(f"{name}={arguments[name]!r} is not supported: {SUPPORTED_QUANTIZATION}")
    for name in QUANTIZATION_TENSORS:
        if arguments[name] is not None:
            raise ValueError(f"{name} was given, which is not supported: {SUPPORTED_QUANTIZATION}")
    for name in ("w1_bias", "w2_bias"):
        if arguments[name] is not None:
            raise ValueError(f"{name} was given: expert biases are not supported yet")


SUPPORTED_QUANTIZATION = (
    "qwen_fast's quantized experts are use_fp8_w8a8=True (float8_e4m3fn w1/w2, fp32 block scales w1_scale/w2_scale, "
    "block_shape [bn, bk]) and use_int8_w8a16=True (int8 w1/w2, fp32 per-channel scales w1_scale [E, 2I] and "
    "w2_scale [E, H]), activations in hidden_states' dtype"
)


def check_quantization(arguments: dict) -> None:
    """vLLM's use_fp8_w8a8 / use_int8_w8a16 against the weights' dtypes and the scales given (`arguments`: the
    call's locals()): the flag, the weights' dtype and the scales must say the same format, else a ValueError or
    TypeError naming the argument. The scales' shapes are the op's checks (qwen_fast.ops.moe)."""
    use_fp8, use_int8 = arguments["use_fp8_w8a8"], arguments["use_int8_w8a16"]
    for name, value in (("use_fp8_w8a8", use_fp8), ("use_int8_w8a16", use_int8)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    if use_fp8 and use_int8:
        raise ValueError("use_fp8_w8a8=True and use_int8_w8a16=True: pick one format (the weights' dtype)")
    flag, wanted = ("use_fp8_w8a8", FP8) if use_fp8 else ("use_int8_w8a16", torch.int8) if use_int8 else (None, None)
    for name in ("w1", "w2"):
        dtype = getattr(arguments[name], "dtype", None)  # not a tensor: the op's checks name it
        if flag is None and dtype in QUANTIZED_DTYPES:
            raise ValueError(
                f"{name} is {dtype}: quantized weights need use_fp8_w8a8=True (float8_e4m3fn, with w1_scale, "
                "w2_scale and block_shape) or use_int8_w8a16=True (int8, with w1_scale and w2_scale)"
            )
        if flag is not None and dtype is not None and dtype != wanted:
            raise TypeError(f"{flag}=True needs w1 and w2 in {wanted}, got {name} in {dtype}")
    if flag is None:
        for name in ("w1_scale", "w2_scale", "block_shape"):
            if arguments[name] is not None:
                raise ValueError(
                    f"{name} was given for unquantized weights: pass use_fp8_w8a8=True or use_int8_w8a16=True with "
                    "quantized w1 and w2"
                )
        return
    for name in ("w1_scale", "w2_scale"):
        if arguments[name] is None:
            raise ValueError(f"{flag}=True needs {name} (the weights' fp32 scales)")
    if use_fp8 and arguments["block_shape"] is None:
        raise ValueError(
            "use_fp8_w8a8=True needs block_shape [bn, bk] (block-scaled weights; per-tensor fp8 is not supported)"
        )
    if use_int8 and arguments["block_shape"] is not None:
        raise ValueError(
            f"use_int8_w8a16=True takes per-channel scales: block_shape must be None (group-wise int8 is not "
            f"supported), got {arguments['block_shape']!r}"
        )


def local_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """topk_ids as local expert ids: expert_map[topk_ids] (-1: another rank's expert), or topk_ids without a map."""
    return topk_ids if expert_map is None else expert_map[topk_ids.long()]


def weigh_input(hidden_states: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_router_weight_on_input (k == 1): x * w in x's dtype (vLLM's a1 * topk_weights.to(a1.dtype)), and
    combine weights of 1."""
    scaled = hidden_states * topk_weights.to(hidden_states.dtype)
    return scaled, torch.ones_like(topk_weights, dtype=torch.float32)


def experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    activation: str = "silu",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: list[int] | None = None,
) -> torch.Tensor:
    """Run every token through its k experts (SwiGLU) and sum the weighted outputs (math in the module docstring):
    the experts alone, as every backend computes them; fused_experts adds vLLM's options around it.

    Args:
        hidden_states: [T, H] float32, float16 or bfloat16.
        w13: [E, 2I, H] (gate rows first, then up rows: transformers' gate_up_proj): hidden_states' dtype, or
            float8_e4m3fn / int8 (quantized, with w13_scale).
        w2: [E, H, I], same dtype as w13 (transformers' down_proj).
        topk_weights: [T, k] float32 (as fused_topk returns) or the model dtype (as transformers' Qwen3 router
            returns); used in fp32.
        topk_ids: [T, k] int32 or int64, expert ids in [0, E), or global ids when expert_map is given.
        expert_map: [global_E] int32 global -> local id or -1 (another rank's expert: y = 0), or None.
        activation: "silu" (SwiGLU) or "gelu" (GeGLU, the exact GELU): act = act_fn(gate) * up.
        w13_scale, w2_scale: None (unquantized), fp32 block scales [E, ceil(2I/bn), ceil(H/bk)] and
            [E, ceil(H/bn), ceil(I/bk)] (fp8), or per-channel scales [E, 2I] and [E, H] (int8).
        block_shape: [bn, bk] for fp8 weights, else None.

    Returns:
        [T, H] in hidden_states' dtype.

    Example:
        >>> T, H, I, E, k = 3, 8, 4, 4, 2
        >>> x, w13, w2 = torch.randn(T, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I)
        >>> ids = torch.tensor([[0, 3], [3, 1], [1, 0]], dtype=torch.int32)
        >>> experts(x, w13, w2, torch.full((T, k), 0.5), ids).shape
        torch.Size([3, 8])
    """
    num_tokens, topk = topk_ids.shape
    num_experts = w13.shape[0]
    intermediate = w2.shape[2]
    flat_ids = local_ids(topk_ids, expert_map).flatten().long()  # pair i = t * k + j
    dtype = hidden_states.dtype if w13.dtype in QUANTIZED_DTYPES else w13.dtype  # the GEMMs' dtype
    quant = block_shape if w13.dtype == FP8 else None

    def weight(w: torch.Tensor, scale: torch.Tensor | None, expert: int) -> torch.Tensor:
        """Expert `expert`'s weights in `dtype`: read as they are, or dequantized (fp32) and rounded once."""
        return w[expert] if scale is None else dequantize(w[expert], scale[expert], quant).to(dtype)

    # y[i] = expert flat_ids[i] applied to token i // k, in the GEMMs' dtype; 0 for a pair of another rank.
    y = torch.zeros(num_tokens * topk, w2.shape[1], dtype=dtype, device=hidden_states.device)
    order = torch.sort(flat_ids, stable=True).indices  # pairs grouped by expert (-1 first)
    counts = torch.bincount(flat_ids + 1, minlength=num_experts + 1).tolist()
    start = counts[0]
    for expert, count in enumerate(counts[1:]):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        x = hidden_states[pairs // topk].to(dtype)
        gate_up = F.linear(x, weight(w13, w13_scale, expert))  # [count, 2I]
        gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
        act = ACTIVATIONS[activation](gate) * up
        y[pairs] = F.linear(act, weight(w2, w2_scale, expert))  # [count, H]

    # Weighted sum over the k choices of each token, in fp32, j ascending.
    y = y.view(num_tokens, topk, w2.shape[1])
    weights = topk_weights.float()
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=hidden_states.device)
    for j in range(topk):
        out += weights[:, j, None] * y[:, j].float()
    return out.to(hidden_states.dtype)


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
    """vLLM's fused_experts (v0.10.1.1 signature): `experts` with the options of the module docstring. w1 is
    transformers' gate_up_proj [E, 2I, H]. global_num_experts (-1: expert_map's length, or E) only sizes the
    routing; allow_deep_gemm / allow_cutlass_... select fp8 kernels in vLLM and change nothing here. Quantized
    weights: use_fp8_w8a8 (w1, w2 float8_e4m3fn, w1_scale, w2_scale, block_shape) or use_int8_w8a16 (w1, w2 int8,
    per-channel w1_scale, w2_scale), computed w8a16 (check_quantization; formats in qwen_fast.reference.quant).

    Example:
        >>> x, w1, w2 = torch.randn(3, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4)
        >>> ids = torch.tensor([[0], [3], [2]])  # global ids; this rank holds experts 2 and 3 as local 0 and 1
        >>> ep = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)
        >>> fused_experts(x, w1, w2, torch.ones(3, 1), ids, expert_map=ep)[0].abs().max().item()
        0.0
    """
    check_unsupported(locals())
    check_quantization(locals())
    x, weights = (
        weigh_input(hidden_states, topk_weights) if apply_router_weight_on_input else (hidden_states, topk_weights)
    )
    out = experts(x, w1, w2, weights, topk_ids, expert_map, activation, w1_scale, w2_scale, block_shape)
    return hidden_states.copy_(out) if inplace else out


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
    global_num_experts: int = -1,
    expert_map: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Route, then run fused_experts: a whole routed MoE layer (without shared experts), as vLLM's fused_moe
    (num_expert_group, topk_group: group-limited top-k, which the functional API accepts only with
    use_grouped_topk=True; custom_routing_function(hidden_states, gating_output, topk, renormalize) -> (weights,
    ids) replaces the routing). options: fused_experts' other keywords, and the routing's keyword-only extras of
    qwen_fast.fused_moe (scoring_func, e_score_correction_bias, routed_scaling_factor, group_scoring).

    Returns:
        [T, H] in hidden_states' dtype. The fp32 weights of fused_topk go straight into the fp32 combine (no cast
        to the model dtype in between, unlike transformers' Qwen3 router).
    """
    routing = {name: options.pop(name) for name in ROUTING_EXTRAS if name in options}
    if custom_routing_function is not None:
        topk_weights, topk_ids = custom_routing_function(hidden_states, gating_output, topk, renormalize)
    else:
        groups = {"num_expert_group": num_expert_group, "topk_group": topk_group}
        topk_weights, topk_ids = topk_routing(gating_output, topk, renormalize, **groups, **routing)
    return fused_experts(
        hidden_states, w1, w2, topk_weights, topk_ids, inplace, activation, is_act_and_mul,
        global_num_experts=global_num_experts, expert_map=expert_map, **options,
    )  # fmt: skip


ROUTING_EXTRAS = ("scoring_func", "e_score_correction_bias", "routed_scaling_factor", "group_scoring")
