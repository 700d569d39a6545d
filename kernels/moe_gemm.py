"""Triton fused_experts: two grouped GEMMs over the (token, choice) pairs sorted by expert, then a combine.

Routing layout, computed by the caller (qwen_fast/ops/moe.py: moe_align_block_size(topk_ids, BLOCK_M, E)): the flat
pair indices i = t * k + j sorted by expert, each expert's run padded to a multiple of BLOCK_M (sentinel T * k), so
that every block of BLOCK_M sorted rows belongs to one expert (expert_ids[block]). Blocks at or past
num_tokens_post_padded (expert_ids 0 there, vLLM's fill) and blocks of expert -1 (expert parallelism: another rank's
expert, after expert_map) are skipped by both GEMMs; the rows of y of such pairs are zeroed first (zero_y), so the
combine adds 0 for them. Row r of the sorted order is pair sorted_token_ids[r]; padding rows are masked everywhere
(never loaded, never stored). This is the grouped GEMM of vLLM's fused_moe and MegaBlocks, written here from that
description.

1. _gate_up_kernel, grid (num_blocks, cdiv(I, BLOCK_N)). Program (b, n) owns rows [b*BLOCK_M, (b+1)*BLOCK_M) of
   the sorted order and intermediate columns [n*BLOCK_N, (n+1)*BLOCK_N) of expert e = expert_ids[b]. Per K step it
   loads the gathered token rows of hidden_states [BLOCK_M, BLOCK_K] and two weight tiles of w13[e] read in place:
   the gate rows n.. and the up rows I + n.., each as [BLOCK_K, BLOCK_N] through w13's strides (no transposed
   copy). Registers hold two fp32 accumulators [BLOCK_M, BLOCK_N]. Epilogue, rounding where the reference rounds:
   gate and up to the activation dtype, silu(gate) (or gelu(gate), GELU) in fp32 to the dtype, the product in fp32
   to the dtype; stored to
   intermediate [num_padded, I] at the sorted row. The [T*k, 2I] gate_up tensor never exists.
2. _down_kernel, grid (num_blocks, cdiv(H, BLOCK_N)). Program (b, n) owns the same BLOCK_M sorted rows and output
   columns [n*BLOCK_N, ...) of expert e: intermediate rows x w2[e][n.., :].T (w2 [E, H, I] read in place as
   [BLOCK_K, BLOCK_N] tiles), fp32 accumulator, rounded to the dtype (as the reference's F.linear) and stored to
   y [T*k, H] at the pair's flat index sorted_token_ids[r] (a scatter: each pair has exactly one row, so every row
   of y is written exactly once, by one program, no atomics).
3. _combine_kernel, grid (T, cdiv(H, BLOCK_H)). Program (t, h) owns out[t, h*BLOCK_H ...]: an fp32 accumulator
   starting at 0, adding float(topk_weights[t, j]) * float(y[t*k + j]) for j = 0 .. k-1 in order, then one cast to
   the output dtype: the reference's combine, deterministic (fixed order, no atomics). The routing weight is applied
   here rather than in the GEMM 2 epilogue so that the product stays in fp32 (y in the dtype times an fp32 weight,
   as the reference), with no extra rounding of a weighted y to the activation dtype.

Quantized experts (kernels/moe_gemm_quant.py: formats, numerics, the w8a16 / w8a8 choice): constexpr WEIGHTS
selects the weight tile's format (0 the activation dtype; 1 fp8 block-scaled, 2 int8 per channel: 1-byte codes and
fp32 scales w_scale [E, ., .] read through stride_se/sn/sk at row n // scale_bn, column k // scale_bk). In w8a16
the tile is dequantized to the activation dtype before tl.dot; with W8A8 the activations come in as fp8 codes with
per-row, per-group scales a_scale (row stride stride_at; GEMM 1 indexes them by token, GEMM 2 by sorted row) and
each K tile's fp8 tl.dot is scaled into the fp32 accumulator. SCALE_K_TILE: a K tile lies in one scale block, so
its scales are a [BLOCK_N] vector (else gathered per element). Unquantized launches pass placeholders.

Offsets: token rows, pair rows and expert bases are int64 (T*k*H and E*2I*H can pass 2^31). fp32 tl.dot uses
input_precision "ieee" (no TF32) so the fp32 backend meets the fp32 tolerance.

Tiles: a tuned entry for the device and layer shape when one exists (qwen_fast.configs, table "moe_gemm", written by
bench/tune_moe.py; keyed by shape_key(), checked by validate_config(); none ship yet), else the heuristic
(_config): BLOCK_M is qwen_fast.configs.moe_block_size.choose_block_size, the rows per active expert rounded up to 16
(decode) ... 128 (prefill), since rows past an expert's count are padding and cost full work.
BLOCK_N/BLOCK_K/warps/stages are fixed per (BLOCK_M, dtype).
16-bit: BLOCK_K = 64 (128-byte rows, one swizzled shared-memory line); GEMM 1 holds two accumulators, so its N tile
is 64 up to BLOCK_M = 64 and 32 at BLOCK_M = 128 (64 spilled on sm_80 and sm_90); GEMM 2 widens N to 128 from
BLOCK_M = 64. fp32 (exact "ieee" dot products on FMA units, operands in registers): N = 32 and K = 32, K = 16 from
BLOCK_M = 64 (wider tiles spilled on sm_80). 1-byte weights (fp8, int8; choose_config() reads w13's dtype):
moe_gemm_quant.quant_tiles, for 16-bit activations (launch_tiles() swaps in its fp32 or per-element tiles at
config's BLOCK_M); tuned tables hold unquantized dtypes only. Every config is listed in compile_specs() and compiled
for sm_80 and sm_90 by `python -m qwen_fast.gpu_check`, which fails on spills, and so is every entry of every tuned
file found.
"""

import torch
import triton
import triton.language as tl

from qwen_fast import configs
from qwen_fast.configs.moe_block_size import BLOCK_SIZES, choose_block_size

from .compile_spec import TRITON_DTYPE, CompileSpec
from .moe_gemm_quant import (
    WEIGHT_FORMATS,
    _dequantize,
    _scales,
    launch_tiles,
    quant_tiles,
    quantize_groups,
    scale_layout,
    uses_w8a8,
)

COMBINE_BLOCK_H = 512  # 512 columns x 4 B fp32 accumulator over 4 warps: 4 registers per thread, 1 KB per row loaded
# What a tuned entry may hold. Tiles are powers of 2 (tl.arange) and at least 16 (tl.dot); BLOCK_M is the
# block_size of moe_align_block_size, which takes any size >= 1: past 256, the rows an expert pads to a block and the
# [BLOCK_M, BLOCK_N] fp32 accumulators outgrow any useful tile, so a larger value is taken for a typo.
TILE_SIZES = (16, 32, 64, 128, 256)
WARPS = (1, 2, 4, 8, 16)
STAGES = range(1, 9)
TILE_FIELDS = {"BLOCK_N": TILE_SIZES, "BLOCK_K": TILE_SIZES, "num_warps": WARPS, "num_stages": STAGES}
SHAPE_FIELDS = ("E", "H", "I", "k", "dtype")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@triton.jit
def _gate_up_kernel(
    hidden,
    w13,
    intermediate,
    sorted_token_ids,
    expert_ids,
    num_tokens_post_padded,
    num_pairs,
    topk,
    hidden_size,
    inter_size,
    stride_ht,
    stride_hh,
    stride_we,
    stride_wn,
    stride_wk,
    w_scale,
    a_scale,
    stride_se,
    stride_sn,
    stride_sk,
    stride_at,
    scale_bn,
    scale_bk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GELU: tl.constexpr,
    WEIGHTS: tl.constexpr,
    W8A8: tl.constexpr,
    SCALE_K_TILE: tl.constexpr,
):
    block = tl.program_id(0)
    col_block = tl.program_id(1)
    if block * BLOCK_M >= tl.load(num_tokens_post_padded):
        return
    expert = tl.load(expert_ids + block).to(tl.int64)
    if expert < 0:
        return
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_token_ids + rows).to(tl.int64)
    row_ok = pairs < num_pairs
    tokens = pairs // topk
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter_size
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = hidden + tokens[:, None] * stride_ht + ks[None, :] * stride_hh
    gate_ptrs = w13 + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    up_ptrs = gate_ptrs + inter_size * stride_wn  # I rows past the gate rows (one expert: I*H << 2^31 elements)
    dtype = intermediate.dtype.element_ty
    s_base = w_scale + expert * stride_se  # quantized weights: scale rows n // bn of the gate and up columns
    gate_rows, up_rows = cols // scale_bn, (inter_size + cols) // scale_bn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = ks < hidden_size - k0
        b_mask = k_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_gate = tl.load(gate_ptrs, mask=b_mask, other=0.0)
        b_up = tl.load(up_ptrs, mask=b_mask, other=0.0)
        if WEIGHTS == 0:
            acc_gate = tl.dot(a, b_gate, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        else:
            s_gate = _scales(s_base, gate_rows, k0, ks, col_ok, b_mask, stride_sn, stride_sk, scale_bk, SCALE_K_TILE)
            s_up = _scales(s_base, up_rows, k0, ks, col_ok, b_mask, stride_sn, stride_sk, scale_bk, SCALE_K_TILE)
            if W8A8:  # fp8 x fp8 per K tile, both scales constant over it
                a_s = tl.load(a_scale + tokens * stride_at + k0 // scale_bk, mask=row_ok, other=0.0)[:, None]
                acc_gate += tl.dot(a, b_gate) * (a_s * s_gate)
                acc_up += tl.dot(a, b_up) * (a_s * s_up)
            else:
                b_gate = _dequantize(b_gate, s_gate, WEIGHTS).to(dtype)
                b_up = _dequantize(b_up, s_up, WEIGHTS).to(dtype)
                acc_gate = tl.dot(a, b_gate, acc_gate, input_precision=DOT_PRECISION)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_hh
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk

    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    if GELU:  # the exact GELU (erf), torch's approximate="none"
        act = (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))).to(dtype).to(tl.float32)
    else:
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    out = (act * up).to(dtype)
    out_ptrs = intermediate + rows[:, None] * inter_size + cols[None, :]
    tl.store(out_ptrs, out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    intermediate,
    w2,
    y,
    sorted_token_ids,
    expert_ids,
    num_tokens_post_padded,
    num_pairs,
    hidden_size,
    inter_size,
    stride_we,
    stride_wn,
    stride_wk,
    w_scale,
    a_scale,
    stride_se,
    stride_sn,
    stride_sk,
    stride_at,
    scale_bn,
    scale_bk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WEIGHTS: tl.constexpr,
    W8A8: tl.constexpr,
    SCALE_K_TILE: tl.constexpr,
):
    block = tl.program_id(0)
    col_block = tl.program_id(1)
    if block * BLOCK_M >= tl.load(num_tokens_post_padded):
        return
    expert = tl.load(expert_ids + block).to(tl.int64)
    if expert < 0:
        return
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_token_ids + rows).to(tl.int64)
    row_ok = pairs < num_pairs
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = intermediate + rows[:, None] * inter_size + ks[None, :]
    b_ptrs = w2 + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    s_base = w_scale + expert * stride_se
    scale_rows = cols // scale_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        k_ok = ks < inter_size - k0
        b_mask = k_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if WEIGHTS == 0:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            scales = _scales(s_base, scale_rows, k0, ks, col_ok, b_mask, stride_sn, stride_sk, scale_bk, SCALE_K_TILE)
            if W8A8:
                a_s = tl.load(a_scale + rows * stride_at + k0 // scale_bk, mask=row_ok, other=0.0)[:, None]
                acc += tl.dot(a, b) * (a_s * scales)
            else:
                b = _dequantize(b, scales, WEIGHTS).to(y.dtype.element_ty)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk

    y_ptrs = y + pairs[:, None] * hidden_size + cols[None, :]
    tl.store(y_ptrs, acc.to(y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(y, topk_weights, out, topk, hidden_size, stride_wt, stride_wk, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden_size
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(0, topk):
        weight = tl.load(topk_weights + token * stride_wt + j * stride_wk).to(tl.float32)
        row = tl.load(y + (token * topk + j) * hidden_size + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += weight * row
    tl.store(out + token * hidden_size + cols, acc.to(out.dtype.element_ty), mask=col_ok)


def _config(block_m: int, dtype: torch.dtype) -> dict:
    """GEMM tiles for one BLOCK_M and dtype: {"gate_up": {...}, "down": {...}} with BLOCK_N, BLOCK_K, warps, stages.
    A quantized weight dtype (WEIGHT_FORMATS) gets moe_gemm_quant.quant_tiles for 16-bit activations."""
    if dtype in WEIGHT_FORMATS:
        return quant_tiles(block_m, torch.bfloat16)  # 16-bit activations; launch_tiles() for fp32
    if dtype == torch.float32:  # exact fp32 dot products run on FMA units: small tiles, operands held in registers
        warps = 4 if block_m <= 32 else 8
        tiles = {"BLOCK_N": 32, "BLOCK_K": 16 if block_m >= 64 else 32, "num_warps": warps, "num_stages": 2}
        return {"gate_up": tiles, "down": tiles}
    warps = 4 if block_m <= 32 else 8
    stages = 3 if block_m <= 64 else 2
    gate_up = {"BLOCK_N": 64 if block_m <= 64 else 32, "BLOCK_K": 64, "num_warps": warps, "num_stages": stages}
    down = {"BLOCK_N": 64 if block_m <= 32 else 128, "BLOCK_K": 64, "num_warps": warps, "num_stages": stages}
    return {"gate_up": gate_up, "down": down}


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def shape_key(num_experts: int, hidden_size: int, inter_size: int, topk: int, dtype: torch.dtype) -> str:
    """The tuned-table key of a layer: "E=128,H=2048,I=768,k=8,dtype=bfloat16" for Qwen3-30B-A3B in bf16."""
    return f"E={num_experts},H={hidden_size},I={inter_size},k={topk},dtype={str(dtype).removeprefix('torch.')}"


def parse_shape_key(shape: str) -> dict:
    """{"E": int, "H": int, "I": int, "k": int, "dtype": torch.dtype} from a shape_key() string; ValueError if not."""
    fields = dict(part.partition("=")[::2] for part in shape.split(","))
    if tuple(fields) != SHAPE_FIELDS or fields["dtype"] not in DTYPES:
        example = shape_key(128, 2048, 768, 8, torch.bfloat16)
        raise ValueError(f"the shape key must look like {example!r}, got {shape!r}")
    if not all(fields[name].isdigit() and int(fields[name]) >= 1 for name in SHAPE_FIELDS[:-1]):
        raise ValueError(f"E, H, I and k in the shape key must be integers >= 1, got {shape!r}")
    return {name: int(fields[name]) for name in SHAPE_FIELDS[:-1]} | {"dtype": DTYPES[fields["dtype"]]}


def _check_choice(name: str, value: object, allowed) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def validate_config(shape: str, entry: dict) -> None:
    """A tuned entry {"BLOCK_M": m, "gate_up": tiles, "down": tiles}, tiles = {"BLOCK_N", "BLOCK_K", "num_warps",
    "num_stages"}, for a shape_key(); ValueError naming the bad field and its value."""
    parse_shape_key(shape)
    if set(entry) != {"BLOCK_M", "gate_up", "down"}:
        raise ValueError(f"must have exactly the keys BLOCK_M, gate_up, down, got {sorted(entry)}")
    _check_choice("BLOCK_M", entry["BLOCK_M"], TILE_SIZES)
    for gemm in ("gate_up", "down"):
        tiles = entry[gemm]
        if not isinstance(tiles, dict) or set(tiles) != set(TILE_FIELDS):
            got = sorted(tiles) if isinstance(tiles, dict) else tiles
            raise ValueError(f"{gemm} must have exactly the keys {', '.join(TILE_FIELDS)}, got {got!r}")
        for field, allowed in TILE_FIELDS.items():
            _check_choice(f"{gemm}.{field}", tiles[field], allowed)


def heuristic_config(num_tokens: int, topk: int, num_experts: int, dtype: torch.dtype) -> dict:
    """The entry the heuristic picks, in validate_config()'s form: BLOCK_M = choose_block_size, tiles = _config."""
    block_m = choose_block_size(num_tokens, topk, num_experts)
    return {"BLOCK_M": block_m, **_config(block_m, dtype)}


def choose_config(num_tokens: int, topk: int, w13: torch.Tensor) -> dict:
    """The tuned entry for w13's device and the layer shape at the nearest tuned T, else heuristic_config()."""
    num_experts, two_i, hidden_size = w13.shape
    shape = shape_key(num_experts, hidden_size, two_i // 2, topk, w13.dtype)
    tuned = configs.lookup("moe_gemm", validate_config, configs.device_name(w13.device), shape, num_tokens)
    return tuned if tuned is not None else heuristic_config(num_tokens, topk, num_experts, w13.dtype)


def _quant_args(weights: int, scale, a_scale: torch.Tensor, block_shape, width: int, per_element: bool, w8a8: bool):
    """The GEMM kernels' quantization arguments (w_scale .. scale_bk, WEIGHTS, W8A8, SCALE_K_TILE) for weights of
    format `weights` (WEIGHT_FORMATS; 0: unquantized, placeholders never read) over K = width."""
    if not weights:
        placeholders = dict.fromkeys(("stride_se", "stride_sn", "stride_sk", "stride_at", "scale_bn", "scale_bk"), 1)
        return {
            "w_scale": a_scale,
            "a_scale": a_scale,
            **placeholders,
            "WEIGHTS": 0,
            "W8A8": False,
            "SCALE_K_TILE": True,
        }
    layout = scale_layout(weights, scale, block_shape, width)
    return {"w_scale": scale, "a_scale": a_scale, **layout, "stride_at": a_scale.stride(0), "WEIGHTS": weights,
            "W8A8": w8a8, "SCALE_K_TILE": not per_element}  # fmt: skip


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    config: dict,
    zero_y: bool = False,
    activation: str = "silu",
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: list[int] | None = None,
    *,
    w8a8: bool | None = None,
) -> torch.Tensor:
    """Launcher; arguments as qwen_fast.fused_experts (checked there) with T >= 1, the routing as
    moe_align_block_size(topk_ids, config["BLOCK_M"], E) lays it out (expert_ids -1: a skipped block), and `config`
    an entry as validate_config() describes (choose_config()'s, or a tuner's candidate). zero_y: some pairs sit in
    skipped blocks (an expert map), so y starts zeroed. activation: "silu" (SwiGLU) or "gelu" (GeGLU). Returns [T, H]
    in hidden_states' dtype.

    Quantized experts (kernels/moe_gemm_quant.py): w13/w2 float8_e4m3fn with w13_scale [E, ceil(2I/bn),
    ceil(H/bk)], w2_scale [E, ceil(H/bn), ceil(I/bk)] fp32 and block_shape [bn, bk]; or int8 with w13_scale [E, 2I],
    w2_scale [E, H] fp32 and block_shape None. w8a8: None picks as uses_w8a8(); True forces the w8a8 kernels (a test
    of them under the interpreter; fp8 weights and 16-bit activations only), False w8a16. fp32 activations run the
    fp32 tiles at config's BLOCK_M (the quantized tiles are sized for 16-bit activations)."""
    num_tokens, topk = topk_weights.shape
    inter_size, hidden_size = w2.shape[2], w2.shape[1]
    dtype, device = hidden_states.dtype, hidden_states.device
    out = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
    num_pairs = num_tokens * topk
    block_m = config["BLOCK_M"]
    num_blocks = expert_ids.shape[0]
    intermediate = torch.empty(sorted_token_ids.shape[0], inter_size, dtype=dtype, device=device)
    y = (torch.zeros if zero_y else torch.empty)(num_pairs, hidden_size, dtype=dtype, device=device)
    precision = _precision(dtype)
    weights = WEIGHT_FORMATS.get(w13.dtype, 0)
    config, per_element = launch_tiles(config, dtype, weights, block_shape)
    if w8a8 is None:
        w8a8 = uses_w8a8(hidden_states, w13, block_shape, config)
    elif w8a8 and (w13.dtype != torch.float8_e4m3fn or dtype == torch.float32 or per_element):
        raise ValueError(f"w8a8 needs fp8 weights, 16-bit activations and bk a multiple of BLOCK_K, got {w13.dtype}, "
                         f"{dtype}, block_shape {block_shape} with {config}")  # fmt: skip
    a_gate_up, a_scale_gate_up = hidden_states, hidden_states  # the activations of GEMM 1 and their scales
    if w8a8:
        a_gate_up, a_scale_gate_up = quantize_groups(hidden_states, block_shape[1])
    elif w13.dtype == torch.float8_e4m3fn:  # w8a16 decodes the bits (sm_80 has no e4m3 conversion)
        w13, w2 = w13.view(torch.uint8), w2.view(torch.uint8)

    gate_up = config["gate_up"]
    _gate_up_kernel[(num_blocks, triton.cdiv(inter_size, gate_up["BLOCK_N"]))](
        a_gate_up,
        w13,
        intermediate,
        sorted_token_ids,
        expert_ids,
        num_tokens_post_padded,
        num_pairs,
        topk,
        hidden_size,
        inter_size,
        a_gate_up.stride(0),
        a_gate_up.stride(1),
        w13.stride(0),
        w13.stride(1),
        w13.stride(2),
        BLOCK_M=block_m,
        DOT_PRECISION=precision,
        GELU=activation == "gelu",
        **_quant_args(weights, w13_scale, a_scale_gate_up, block_shape, hidden_size, per_element, w8a8),
        **gate_up,
    )
    a_down, a_scale_down = intermediate, intermediate
    if w8a8:
        a_down, a_scale_down = quantize_groups(intermediate, block_shape[1])
    down = config["down"]
    _down_kernel[(num_blocks, triton.cdiv(hidden_size, down["BLOCK_N"]))](
        a_down,
        w2,
        y,
        sorted_token_ids,
        expert_ids,
        num_tokens_post_padded,
        num_pairs,
        hidden_size,
        inter_size,
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        BLOCK_M=block_m,
        DOT_PRECISION=precision,
        **_quant_args(weights, w2_scale, a_scale_down, block_shape, inter_size, per_element, w8a8),
        **down,
    )
    _combine_kernel[(num_tokens, triton.cdiv(hidden_size, COMBINE_BLOCK_H))](
        y,
        topk_weights,
        out,
        topk,
        hidden_size,
        topk_weights.stride(0),
        topk_weights.stride(1),
        BLOCK_H=COMBINE_BLOCK_H,
        num_warps=4,
    )
    return out


def _launch_configs() -> list[tuple[torch.dtype, int, dict]]:
    """(dtype, BLOCK_M, config) of every GEMM config the launcher can pick: the heuristic's, then each tuned file's
    (every device, every search directory), without repeats."""
    found = [(dtype, m, _config(m, dtype)) for dtype in DTYPES.values() for m in BLOCK_SIZES]
    found += [
        (parse_shape_key(shape)["dtype"], entry["BLOCK_M"], entry)
        for _, shape, _, entry in configs.entries("moe_gemm", validate_config)
    ]
    unique = {(dtype, m, repr(tiles["gate_up"]), repr(tiles["down"])): (dtype, m, tiles) for dtype, m, tiles in found}
    return list(unique.values())


def gemm_specs(dtype: torch.dtype, block_m: int, config: dict, quant: tuple = (None, False, True)) -> list[CompileSpec]:
    """The gate_up kernel (silu and gelu) and the down kernel as launched with one config (tiles {"gate_up": ...,
    "down": ...}), activations of `dtype`; quant = (weight dtype, W8A8, SCALE_K_TILE): None for unquantized weights,
    float8_e4m3fn or int8 (kernels/moe_gemm_quant.py)."""
    weight_dtype, w8a8, k_tile = quant
    specs, pointer = [], "*" + TRITON_DTYPE[dtype]
    weights = WEIGHT_FORMATS.get(weight_dtype, 0)
    weight_pointer = {0: pointer, 1: "*fp8e4nv" if w8a8 else "*u8", 2: "*i8"}[weights]
    a_pointer = "*fp8e4nv" if w8a8 else pointer
    for kernel, names, ints, tiles, variants in (
        (_gate_up_kernel, ("hidden", "w13", "intermediate"), 9, config["gate_up"], ({"GELU": False}, {"GELU": True})),
        (_down_kernel, ("intermediate", "w2", "y"), 6, config["down"], ({},)),
    ):
        signature = dict(zip(names, (a_pointer, weight_pointer, pointer), strict=True))
        signature |= {"sorted_token_ids": "*i32", "expert_ids": "*i32", "num_tokens_post_padded": "*i32"}
        scalars = list(kernel.arg_names[6 : 6 + ints])
        signature |= {name: "i64" if name.startswith("stride") else "i32" for name in scalars}
        signature |= {"w_scale": "*fp32" if weights else pointer, "a_scale": "*fp32" if w8a8 else pointer}
        signature |= {
            name: "i32" for name in ("stride_se", "stride_sn", "stride_sk", "stride_at", "scale_bn", "scale_bk")
        }
        signature |= {name: "constexpr" for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "DOT_PRECISION")}
        constexprs = {"BLOCK_M": block_m, "BLOCK_N": tiles["BLOCK_N"], "BLOCK_K": tiles["BLOCK_K"]}
        constexprs["DOT_PRECISION"] = _precision(dtype)
        formats = {"WEIGHTS": weights, "W8A8": w8a8, "SCALE_K_TILE": k_tile}
        aligned = ()
        if weights:  # as launched at the models' shapes: i32 strides, unit ones specialized, multiples of 16 aligned
            signature |= {name: "i32" for name in scalars}
            ones = ["stride_hh", "stride_wk"] + (["stride_sk"] if weights == 1 else ["stride_sn", "scale_bn"])
            formats |= {name: 1 for name in ones if name in signature}
            aligned = (*names, "hidden_size", "inter_size", "stride_ht", "stride_we", "stride_wn", "w_scale", "a_scale")
            aligned = tuple(name for name in aligned if name in signature and name not in formats)
        label = f"{TRITON_DTYPE[dtype]} M={block_m} N={tiles['BLOCK_N']} K={tiles['BLOCK_K']} S={tiles['num_stages']}"
        if weights:
            label += f" {weight_pointer[1:]}" + (" w8a8" if w8a8 else "") + ("" if k_tile else " scales per element")
        for variant in variants:
            specs.append(
                CompileSpec(
                    kernel,
                    signature | {name: "constexpr" for name in (*variant, *formats)},
                    constexprs | variant | formats,
                    num_warps=tiles["num_warps"],
                    num_stages=tiles["num_stages"],
                    label=label + (" gelu" if variant.get("GELU") else ""),
                    aligned=aligned,
                    min_arch=90 if w8a8 else 0,
                )
            )
    return specs


def _quantized_specs() -> list[CompileSpec]:
    """Every quantized variant the launcher can run, at the heuristic's tiles (moe_gemm_quant.quant_tiles): fp8 w8a16
    (scales per tile, and per element at the per-element tiles), int8, and fp8 w8a8 (16-bit activations, sm_90)."""
    fp8, specs = torch.float8_e4m3fn, []
    for dtype in DTYPES.values():
        for block_m in BLOCK_SIZES:
            tiles, per_element = quant_tiles(block_m, dtype), quant_tiles(block_m, dtype, per_element=True)
            variants = [
                (tiles, (fp8, False, True)),
                (per_element, (fp8, False, False)),
                (tiles, (torch.int8, False, True)),
            ]
            variants += [(tiles, (fp8, True, True))] if dtype != torch.float32 else []
            specs += [spec for config, quant in variants for spec in gemm_specs(dtype, block_m, config, quant)]
    return specs


def compile_specs() -> list[CompileSpec]:
    specs = [spec for dtype, block_m, config in _launch_configs() for spec in gemm_specs(dtype, block_m, config)]
    specs += _quantized_specs()
    for dtype in DTYPES.values():
        pointer = "*" + TRITON_DTYPE[dtype]
        for weight_dtype in dict.fromkeys((torch.float32, dtype)):
            signature = {"y": pointer, "topk_weights": "*" + TRITON_DTYPE[weight_dtype], "out": pointer}
            signature |= {"topk": "i32", "hidden_size": "i32", "stride_wt": "i64", "stride_wk": "i64"}
            signature["BLOCK_H"] = "constexpr"
            specs.append(
                CompileSpec(
                    _combine_kernel,
                    signature,
                    {"BLOCK_H": COMBINE_BLOCK_H},
                    num_warps=4,
                    label=f"{TRITON_DTYPE[dtype]} weights {TRITON_DTYPE[weight_dtype]}",
                )
            )
    return specs
