"""Samples of the routing and MoE ops: fused_topk, moe_align_block_size, fused_experts, fused_moe.

The awkward shapes of DESIGN.md's testing rules (T = 0 and 1, prime expert counts, k = E, H and I not multiples of
any tile, all tokens on one expert, experts with no tokens, block_size 1), exact ties (top-k ids are compared bit
for bit), and every tensor argument as a non-contiguous or stride-0 view.
"""

import torch

from qwen_fast.reference.quant import quantize_fp8, quantize_int8

from .inputs import Inputs, OpSpec, Sample, expanded, index_layout, relayout, spaced


def _topk(tokens, experts, topk, renormalize=True, bias=None, **routing):
    """fused_topk on grid logits; `bias`: the dtype of an e_score_correction_bias on the 1/1024 grid."""

    def build(x: Inputs) -> dict:
        logits = x.grid(tokens, experts)
        kwargs = {"hidden_states": _hidden(logits), "gating_output": logits, "topk": topk, "renormalize": renormalize}
        kwargs |= routing
        if bias is not None:
            kwargs["e_score_correction_bias"] = x.grid(experts, dtype=torch.float32).div(16).to(bias)
        return kwargs

    return build


def _hidden(logits: torch.Tensor) -> torch.Tensor:
    """fused_topk's hidden_states for `logits` [T, E]: [T, 8] (vLLM's signature reads only its T)."""
    return logits.new_zeros(logits.shape[0], 8)


def _logits(make, topk, **routing):
    """fused_topk on logits made by make(x) (ties and near ties)."""

    def build(x: Inputs) -> dict:
        logits = make(x)
        return {"hidden_states": _hidden(logits), "gating_output": logits, "topk": topk, **routing}

    return build


def _near_ties(x: Inputs) -> torch.Tensor:
    """bf16/fp16 grid logits moved up by 0 to 3 units in the last place of their dtype: distinct scores differ by
    >= 2^-11 relative, far above fp32 rounding, so every backend orders them exactly as the reference."""
    logits, steps = x.grid(16, 128), x.randint(0, 4, 16, 128)
    for step in (1, 2, 3):
        logits = torch.where(steps >= step, torch.nextafter(logits, torch.full_like(logits, float("inf"))), logits)
    return logits


def _underflow(x: Inputs) -> torch.Tensor:
    """One dominant expert: exp(x - max) is 0 for all the others, though their logits differ (a tie at 0)."""
    logits = torch.linspace(-400, -200, 512).expand(3, -1).clone()
    logits[:, 256] = 100.0
    return x.put(logits)


DEEPSEEK_V3 = {"scoring_func": "sigmoid", "num_expert_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}
SIGMOID_GROUPS = {"scoring_func": "sigmoid", "num_expert_group": 4, "topk_group": 2}
LOW = (torch.bfloat16, torch.float16)

FUSED_TOPK = OpSpec(
    samples=(
        Sample("T7-E16-k4", _topk(7, 16, 4)),
        Sample("T0", _topk(0, 16, 4)),
        Sample("T1-E61-k8-nonorm", _topk(1, 61, 8, False)),
        Sample("k=E-prime", _topk(5, 61, 61)),
        Sample("E512-k8", _topk(9, 512, 8)),
        Sample("T257-E8-k2-nonorm", _topk(257, 8, 2, False)),
        Sample("T64-k=E128-nonorm", _topk(64, 128, 128, False), interpret=False),
        Sample("ties-all-equal", _logits(lambda x: x.zeros(5, 61), 8)),
        Sample("ties-all-equal-k=E512", _logits(lambda x: x.zeros(5, 512), 512), interpret=False),
        Sample("ties-duplicates", _logits(lambda x: x.randint(0, 4, 9, 61).div(2).to(x.dtype), 8)),
        Sample("ties-duplicates-E512-k1", _logits(lambda x: x.randint(0, 4, 9, 512).div(2).to(x.dtype), 1)),
        Sample("ties-sigmoid-saturated-expanded", _logits(  # sigmoid(20..40) == 1.0 in fp32; stride-0 rows
            lambda x: expanded(x.put(torch.linspace(40, 20, 61))[None], (3, 61)), 8, scoring_func="sigmoid")),
        Sample("ties-softmax-underflow", _logits(_underflow, 8)),
        Sample("ties-groups", _logits(lambda x: x.zeros(5, 64), 2, scoring_func="sigmoid", num_expert_group=4,
                                      topk_group=1)),
        Sample("near-ties", _logits(_near_ties, 8), dtypes=LOW),
        Sample("near-ties-sigmoid", _logits(_near_ties, 8, scoring_func="sigmoid"), dtypes=LOW),
        Sample("near-ties-k=E", _logits(_near_ties, 128, renormalize=False), dtypes=LOW, interpret=False),
        Sample("sigmoid", _topk(17, 61, 8, scoring_func="sigmoid")),
        Sample("deepseek-v3", _topk(7, 256, 8, bias=torch.float32, **DEEPSEEK_V3)),
        Sample("deepseek-v3-nonorm-bf16-bias", _topk(7, 256, 8, False, bias=torch.bfloat16, **DEEPSEEK_V3)),
        Sample("groups-of-6-bias", _topk(33, 24, 3, bias=torch.float32, **SIGMOID_GROUPS)),
        Sample("softmax-groups-nonorm", _topk(9, 60, 5, False, num_expert_group=3, topk_group=1)),
        Sample("groups-of-one", _topk(5, 8, 2, scoring_func="sigmoid", num_expert_group=8, topk_group=3)),
        Sample("groups-max-bias", _topk(33, 24, 3, bias=torch.float32, group_scoring="max", **SIGMOID_GROUPS)),
        Sample("groups-top2-no-bias", _topk(9, 60, 5, num_expert_group=6, topk_group=2, group_scoring="top2_sum")),
        Sample("ids-int64", _topk(7, 16, 4, indices_type=torch.int64)),
        Sample("k=all-kept-nonorm", _topk(4, 16, 8, False, bias=torch.float32, **SIGMOID_GROUPS)),
        Sample("logits-spaced", _logits(lambda x: spaced(spaced(x.grid(7, 61), 0), 1), 4)),
        Sample("logits-column-major", _logits(lambda x: relayout(x.grid(9, 16), 0, 1), 4)),
        index_layout("bias-spaced-expanded-logits", lambda x: {
            "hidden_states": x.zeros(6, 8), "gating_output": expanded(x.grid(1, 24), (6, 24)), "topk": 3,
            "scoring_func": "sigmoid",
            "e_score_correction_bias": spaced(x.grid(24, dtype=torch.float32).div(16)), "num_expert_group": 4,
            "topk_group": 2}),
        Sample("gpu-T70000", _topk(70000, 128, 8), gpu=True),  # > 65,535 programs along one grid axis
        Sample("gpu-k=E1024", _topk(300, 1024, 1024), gpu=True),
        Sample("gpu-groups-of-one-E1024", _topk(100, 1024, 6, scoring_func="sigmoid", num_expert_group=1024,
                                                topk_group=6), gpu=True),
        Sample("gpu-deepseek-v3-T4096", _topk(4096, 256, 8, **DEEPSEEK_V3), gpu=True),
    ),
    interpret_dtypes=(torch.float32, torch.float16, torch.bfloat16),  # no tl.dot: bf16 is exact in the interpreter
    opcheck=("T0", "deepseek-v3"),
)  # fmt: skip


def _align(make_ids, block_size, num_experts, **options):
    """moe_align_block_size on make_ids(x); the dtype under test is topk_ids' (x.dtype)."""
    return lambda x: {"topk_ids": make_ids(x), "block_size": block_size, "num_experts": num_experts, **options}


def _expert_map(x: Inputs, num_experts: int) -> torch.Tensor:
    """An expert-parallel map: this rank holds the odd experts (local ids 0, 1, ...), the others are -1."""
    local = torch.full((num_experts,), -1, dtype=torch.int32)
    local[1::2] = torch.arange(num_experts // 2, dtype=torch.int32)
    return x.put(local)


def _ids(tokens, experts, topk):
    return lambda x: x.expert_ids(tokens, experts, topk, x.dtype)


def _hot(x: Inputs) -> torch.Tensor:
    """Half the pairs on expert 5, the rest spread over 128."""
    ids = x.randint(0, 128, 257, 8)
    ids[::2] = 5
    return ids.to(x.dtype)


MOE_ALIGN_BLOCK_SIZE = OpSpec(
    samples=(
        Sample("T7-E8-k2-b4", _align(_ids(7, 8, 2), 4, 8)),
        Sample("T0", _align(_ids(0, 128, 8), 16, 128)),
        Sample("decode-T1-E128-k8", _align(_ids(1, 128, 8), 16, 128)),
        Sample("prime-E61-b1", _align(_ids(37, 61, 4), 1, 61)),
        Sample("k=E-b64", _align(_ids(5, 16, 16), 64, 16)),
        Sample("one-expert-b1", _align(lambda x: x.ints([[60, 60]] * 300, x.dtype), 1, 61)),
        Sample("one-expert-b64", _align(lambda x: x.ints([[3]] * 50, x.dtype), 64, 8)),
        Sample("few-experts-b16", _align(lambda x: x.ints([0, 63, 127], x.dtype)[x.randint(0, 3, 150, 8)], 16, 128)),
        Sample("hot-expert-b64", _align(_hot, 64, 128)),
        Sample("E1024-b16", _align(_ids(100, 1024, 2), 16, 1024)),
        Sample("T257-E61-k8-b16", _align(_ids(257, 61, 8), 16, 61)),  # several Triton tiles
        Sample("every-expert-once-b16", _align(lambda x: x.ints(list(range(12)), x.dtype).view(3, 4), 16, 12)),
        Sample("expert-map-b4", lambda x: _align(_ids(9, 8, 2), 4, 8, expert_map=_expert_map(x, 8))(x)),
        Sample("pad-sorted-ids-b5", _align(_ids(7, 8, 2), 5, 8, pad_sorted_ids=True)),
        Sample("ids-spaced", _align(lambda x: spaced(spaced(x.expert_ids(9, 16, 4, x.dtype), 0, 0), 1, 0), 4, 16)),
        Sample("ids-column-major", _align(lambda x: relayout(x.expert_ids(9, 16, 4, x.dtype), 0, 1), 4, 16)),
        Sample("ids-expanded", _align(lambda x: expanded(x.expert_ids(1, 16, 4, x.dtype), (9, 4), 0), 4, 16)),
        Sample("gpu-T131072-E128-k8", _align(_ids(131072, 128, 8), 64, 128), gpu=True),
        Sample("gpu-T1025-E8-k8", _align(_ids(1025, 8, 8), 64, 8), gpu=True),
        Sample("gpu-E4096", _align(_ids(5000, 4096, 3), 16, 4096), gpu=True),
    ),
    dtypes=(torch.int32, torch.int64),
    interpret_dtypes=(torch.int32, torch.int64),
    opcheck=("T0",),
)  # fmt: skip


def _route(x: Inputs, tokens: int, experts: int, topk: int, route: str) -> torch.Tensor:
    """int32 [T, k] ids: 'random' (distinct per token), 'one-expert' (every token on expert 3, k = 1), 'sparse'
    (every token on the same k of E experts, the others get nothing)."""
    if route == "one-expert":
        return x.ints([[3]] * tokens).view(tokens, 1)
    if route == "sparse":
        return x.perm(experts, torch.int32)[:topk].expand(tokens, topk)[:, x.perm(topk)].contiguous()
    return x.expert_ids(tokens, experts, topk)


def _experts(tokens, experts, topk, hidden=40, inter=24, route="random", weights=torch.float32, views=None,
             local=None, **options):  # fmt: skip
    """fused_experts with N(0, 1/fan_in) weights; `weights`: topk_weights' dtype (None: the model dtype);
    `views(args)`: the arguments replaced by views of the same values; `local`: this rank's experts of `experts`
    global ones (an expert_map of _expert_map's: the odd experts); options: other keyword arguments."""

    def build(x: Inputs) -> dict:
        ids = _route(x, tokens, experts, topk, route)
        if local is not None:
            options["expert_map"] = _expert_map(x, experts)
        args = {
            "hidden_states": x.randn(tokens, hidden),
            "w1": x.randn(local or experts, 2 * inter, hidden, scale=hidden**-0.5),
            "w2": x.randn(local or experts, hidden, inter, scale=inter**-0.5),
            "topk_weights": x.rand(*ids.shape, dtype=weights or x.dtype),
            "topk_ids": ids,
            **options,
        }
        return args | (views(args) if views else {})

    return build


def _quantized(fmt: str, block: list[int] | None = None, strided: bool = False):
    """views: w1 and w2 quantized (qwen_fast.reference.quant: fp8 with `block`, or int8 per channel) with their
    scales and vLLM's flag; `strided`: the scales stored transposed (the same values, other strides)."""

    def views(args: dict) -> dict:
        if fmt == "int8":
            (w1, s1), (w2, s2) = quantize_int8(args["w1"]), quantize_int8(args["w2"])
            quant = {"use_int8_w8a16": True}
        else:
            (w1, s1), (w2, s2) = quantize_fp8(args["w1"], block), quantize_fp8(args["w2"], block)
            quant = {"use_fp8_w8a8": True, "block_shape": block}
        if strided:
            s1, s2 = (relayout(s, s.dim() - 2, s.dim() - 1) for s in (s1, s2))
        return {"w1": w1, "w2": w2, "w1_scale": s1, "w2_scale": s2, **quant}

    return views


FUSED_EXPERTS = OpSpec(
    samples=(
        Sample("T7-E8-k2", _experts(7, 8, 2, 32, 16)),
        Sample("T0", _experts(0, 16, 4)),
        Sample("T1-E61-k8", _experts(1, 61, 8)),
        Sample("k=E", _experts(9, 8, 8)),
        Sample("one-expert", _experts(33, 8, 1, route="one-expert")),
        Sample("sparse-E61", _experts(21, 61, 3, route="sparse")),
        Sample("T64-E61-k8", _experts(64, 61, 8)),
        Sample("T257-E61-k8", _experts(257, 61, 8), interpret=False),
        Sample("weights-in-model-dtype", _experts(9, 8, 2, weights=None)),
        Sample("expert-map-E16-local8", _experts(9, 16, 3, local=8)),
        Sample("expert-map-one-expert", _experts(33, 16, 1, local=8, route="one-expert")),  # expert 3: local 1
        Sample("router-weight-on-input-k1", _experts(9, 8, 1, apply_router_weight_on_input=True)),
        Sample("gelu", _experts(9, 8, 2, 32, 16, activation="gelu")),
        Sample("gelu-expert-map", _experts(9, 16, 3, local=8, activation="gelu")),
        Sample("ids-int64", _experts(9, 8, 2, views=lambda a: {"topk_ids": a["topk_ids"].long()})),
        Sample("experts-transposed", _experts(9, 8, 2, views=lambda a: {  # stored [E, H, 2I] and [E, I, H]
            "w1": relayout(a["w1"], 1, 2), "w2": relayout(a["w2"], 1, 2)})),
        Sample("experts-expanded", _experts(9, 8, 2, views=lambda a: {  # one expert's weights for all: stride 0
            "w1": expanded(a["w1"][:1], a["w1"].shape), "w2": expanded(a["w2"][:1], a["w2"].shape)})),
        Sample("hidden-spaced", _experts(9, 8, 2, views=lambda a: {"hidden_states": spaced(a["hidden_states"], 0)})),
        index_layout("routing-spaced", _experts(9, 8, 2, views=lambda a: {
            "topk_ids": spaced(spaced(a["topk_ids"], 0, 0), 1, 0), "topk_weights": relayout(a["topk_weights"], 0, 1)})),
        index_layout("routing-expanded", _experts(9, 8, 2, views=lambda a: {
            "topk_ids": expanded(a["topk_ids"][:1], (9, 2), 0), "topk_weights": expanded(a["topk_weights"][:1], (9, 2))
        })),
        *(Sample(f"gpu-qwen3-30b-T{t}", _experts(t, 128, 8, 2048, 768), gpu=True, dtypes=LOW)
          for t in (1, 64, 512, 1024, 2048)),  # every BLOCK_M: 16, 16, 32, 64, 128
        # Quantized experts (w8a16): partial blocks in both dimensions (H = 40, I = 24), a block no tile divides,
        # checkpoints' 128 x 128 blocks (fp32 activations: on sm_90 the triton backend runs 16-bit activations with
        # 128-blocks as w8a8, which has its own reference), int8 per channel, with an expert map.
        Sample("fp8-block16", _experts(9, 8, 2, views=_quantized("fp8", [16, 16]))),
        Sample("fp8-block7x5", _experts(9, 8, 2, views=_quantized("fp8", [7, 5]))),
        Sample("fp8-block128-T1-E61-k8", _experts(1, 61, 8, views=_quantized("fp8", [128, 128])),
               dtypes=(torch.float32,)),
        Sample("int8", _experts(9, 8, 2, views=_quantized("int8"))),
        Sample("int8-expert-map", _experts(9, 16, 3, local=8, views=_quantized("int8"))),
        Sample("fp8-scales-transposed", _experts(9, 8, 2, views=_quantized("fp8", [16, 8], strided=True))),
        Sample("int8-scales-transposed", _experts(9, 8, 2, views=_quantized("int8", strided=True))),
    ),
    opcheck=("int8",),  # fp8 weights: tests/test_moe_quant.py (opcheck's schema check cannot compare fp8 tensors)
)  # fmt: skip


def _moe(tokens, experts, topk, views=None, **routing):
    def build(x: Inputs) -> dict:
        args = {
            "hidden_states": x.randn(tokens, 40),
            "w1": x.randn(experts, 48, 40, scale=40**-0.5),
            "w2": x.randn(experts, 40, 24, scale=24**-0.5),
            "gating_output": x.randn(tokens, experts, dtype=torch.float32),
            "topk": topk,
            **routing,
        }
        return args | (views(args) if views else {})

    return build


FUSED_MOE = OpSpec(
    samples=(
        Sample("T7-E8-k2", _moe(7, 8, 2)),
        Sample("T0", _moe(0, 8, 2)),
        Sample("T1-E61-k8", _moe(1, 61, 8)),
        Sample("grouped-sigmoid", _moe(9, 8, 2, use_grouped_topk=True, routed_scaling_factor=2.5, **SIGMOID_GROUPS)),
        Sample("grouped-softmax", _moe(9, 8, 2, use_grouped_topk=True, num_expert_group=4, topk_group=2)),
        Sample("gelu", _moe(9, 8, 2, activation="gelu")),
        Sample("gating-spaced", _moe(9, 8, 2, views=lambda a: {"gating_output": spaced(a["gating_output"], 0)})),
    ),
)
