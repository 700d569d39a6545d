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
bench/tune_moe.py; keyed by shape_key(), checked by validate_config(); none ship yet), else heuristic_config(), for
the device's arch family (compile_spec.device_arch: 90 for sm_90+, 80 below; CPU tensors take 90):
BLOCK_M is qwen_fast.configs.moe_block_size.choose_block_size, the rows the busiest experts get, rounded up to 16
(decode) ... 128 (prefill): each block re-reads its expert's weights, so BLOCK_M follows the experts' real counts as
far as the host knows them without a sync (at most T rows an expert; the global E under an expert map), not the mean.
16-bit tiles (_config; registers / shared memory as launched, Triton 3.8, gpu_check):
- BLOCK_M 16 (decode, weight-bandwidth bound): N is the widest of 64, 32, 16 whose grid, (blocks with rows =
  min(E, T*k)) x cdiv(N dim, N), fills every SM once (decode_n; the device's SM count, else 132 / 108), so T = 1 runs
  8 x 24 = 192 gate_up CTAs for Qwen3-30B-A3B (N 32; N 64 gave 96 on 132 SMs) and 8 x 24 for 235B (N 64). Narrower
  N rather than split-K: gate_up's epilogue, silu(gate) * up, needs the whole K sum, so split-K would add an fp32
  partial buffer and a reduction pass, while at one to sixteen rows a narrower N costs nothing (the weights are read
  once either way; only the 1-16 activation rows are re-read). K 128 and 4 stages on sm_90 (gate_up N 64: 104
  registers, 108 KiB), K 64 and 4 stages on sm_80 (80 registers, 54 KiB), 4 warps.
- BLOCK_M 32 and 64: gate_up N 64, K 64; down N 64 (M 32) or 128 (M 64); 4 warps; 4 stages on sm_90 (at most 136
  registers, 96 KiB), 3 on sm_80.
- BLOCK_M 128 (prefill, compute bound): sm_90 gate_up 128 x (2 x 128) x 64 with 3 stages (228 registers, 144 KiB)
  and down 128 x 128 x 64 with 4 stages (109 registers, 128 KiB), 8 warps; sm_80 gate_up N 64 and down N 128, 3
  stages (149 and 200 registers, 64 KiB: also within the 99 KiB of sm_86/sm_89).
fp32 (exact "ieee" dot products on FMA units, operands in registers; the interpreter's and a fallback's): N = 32,
K = 32, K = 16 from BLOCK_M = 64, 2 stages (M 32's gate_up holds 252 registers on sm_80). 1-byte weights (fp8,
int8; choose_config() reads w13's dtype): moe_gemm_quant.quant_tiles for 16-bit activations (launch_tiles() swaps
in its fp32 or per-element tiles at config's BLOCK_M); tuned tables hold unquantized dtypes only (QUANT_KINDS lists
the quantized launches checked). Every config the heuristic can pick for each family and every entry of every
tuned file found is launched on meta tensors at the MODEL_SHAPES
(compile_specs()) and compiled as launched for its arch by `python -m qwen_fast.gpu_check`, which fails on spills.
num_pairs (T-dependent) is not specialised, so one binary serves odd and even T * k.
"""

import functools
import itertools
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

from qwen_fast import configs
from qwen_fast.configs.moe_block_size import BLOCK_SIZES, choose_block_size

from .compile_spec import ARCH_SMS, DEFAULT_ARCHS, META, CompileSpec, device_arch, launches
from .compile_spec import num_sms as device_sms
from .moe_gemm_quant import (
    WEIGHT_FORMATS,
    _dequantize,
    _quantize_groups_kernel,
    _scales,
    launch_tiles,
    quant_tiles,
    quantize_groups,
    scale_layout,
    uses_w8a8,
)

DECODE_N = (64, 32, 16)  # N tiles at BLOCK_M 16, widest first
COMBINE_BLOCK_H = 512  # 512 columns x 4 B fp32 accumulator over 4 warps: 4 registers per thread, 1 KB per row loaded
# What a tuned entry may hold. Tiles are powers of 2 (tl.arange) and at least 16 (tl.dot); BLOCK_M is the
# block_size of moe_align_block_size, which takes any size >= 1: past 256, the rows an expert pads to a block and the
# [BLOCK_M, BLOCK_N] fp32 accumulators outgrow any useful tile, so a larger value is taken for a typo.
TILE_SIZES = (16, 32, 64, 128, 256)
WARPS = (1, 2, 4, 8, 16)
STAGES = range(1, 9)
TILE_FIELDS = {"BLOCK_N": TILE_SIZES, "BLOCK_K": TILE_SIZES, "num_warps": WARPS, "num_stages": STAGES}
SHAPE_FIELDS = ("E", "H", "I", "k", "dtype")
# Layer shapes (E, H, I, k) the static check launches at: the two Qwen3-MoE sizes.
MODEL_SHAPES = {"Qwen3-30B-A3B": (128, 2048, 768, 8), "Qwen3-235B-A22B": (128, 4096, 1536, 8)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@triton.jit(do_not_specialize=["num_pairs"])  # one binary for odd and even T * k
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


@triton.jit(do_not_specialize=["num_pairs"])
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


def decode_n(blocks: int, dim: int, num_sms: int) -> int:
    """The widest N tile of DECODE_N whose grid `blocks` x cdiv(dim, N) fills every SM at least once; else the
    narrowest."""
    return next((n for n in DECODE_N if blocks * triton.cdiv(dim, n) >= num_sms), DECODE_N[-1])


def _config(block_m: int, dtype: torch.dtype, arch: int, decode_tiles: tuple[int, int] = (64, 64)) -> dict:
    """GEMM tiles {"gate_up": {...}, "down": {...}} (BLOCK_N, BLOCK_K, num_warps, num_stages) for one BLOCK_M, dtype
    and arch family (80 or 90); decode_tiles: the (gate_up, down) N tiles at BLOCK_M 16 (decode_n). A quantized
    weight dtype (WEIGHT_FORMATS) gets moe_gemm_quant.quant_tiles for 16-bit activations (launch_tiles() swaps in the
    fp32 or per-element ones)."""
    if dtype in WEIGHT_FORMATS:
        return quant_tiles(block_m, torch.bfloat16)
    if dtype == torch.float32:  # exact fp32 dot products run on FMA units: small tiles, operands held in registers
        warps = 4 if block_m <= 32 else 8
        tiles = {"BLOCK_N": 32, "BLOCK_K": 16 if block_m >= 64 else 32, "num_warps": warps, "num_stages": 2}
        return {"gate_up": tiles, "down": tiles}
    hopper = arch >= 90
    if block_m == 16:  # decode: weight-bandwidth bound; N tiles that fill the SMs, long K steps, a deep pipeline
        k_step = 128 if hopper else 64
        return {
            name: {"BLOCK_N": n, "BLOCK_K": k_step, "num_warps": 4, "num_stages": 4}
            for name, n in zip(("gate_up", "down"), decode_tiles, strict=True)
        }
    if block_m <= 64:
        warps, stages = 4, 4 if hopper else 3
        gate_up = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": warps, "num_stages": stages}
        down = {"BLOCK_N": 64 if block_m == 32 else 128, "BLOCK_K": 64, "num_warps": warps, "num_stages": stages}
        return {"gate_up": gate_up, "down": down}
    gate_up = {"BLOCK_N": 128 if hopper else 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    down = {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4 if hopper else 3}
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


def heuristic_config(num_tokens: int, topk: int, num_experts: int, hidden_size: int, inter_size: int,
                     dtype: torch.dtype, arch: int = 90, num_sms: int | None = None) -> dict:  # fmt: skip
    """The entry the heuristic picks, in validate_config()'s form: BLOCK_M = choose_block_size over the routed
    experts (num_experts: the global count under an expert map), tiles = _config for the arch family (80 or 90), at
    BLOCK_M 16 with the N tiles decode_n picks for num_sms SMs (default: the family's ARCH_SMS).

        >>> heuristic_config(1, 8, 128, 2048, 768, torch.bfloat16)["gate_up"]  # Qwen3-30B-A3B decode on sm_90
        {'BLOCK_N': 32, 'BLOCK_K': 128, 'num_warps': 4, 'num_stages': 4}
    """
    block_m = choose_block_size(num_tokens, topk, num_experts)
    blocks = min(num_experts, num_tokens * topk)  # blocks with rows at BLOCK_M 16 (exact at one token)
    num_sms = ARCH_SMS[arch] if num_sms is None else num_sms
    decode_tiles = (decode_n(blocks, inter_size, num_sms), decode_n(blocks, hidden_size, num_sms))
    return {"BLOCK_M": block_m, **_config(block_m, dtype, arch, decode_tiles)}


def choose_config(num_tokens: int, topk: int, w13: torch.Tensor, num_experts: int | None = None) -> dict:
    """The tuned entry for w13's device and the layer shape at the nearest tuned T, else heuristic_config() for the
    device's arch family. num_experts: the experts the ids route to (the global count under an expert map; default
    w13's E)."""
    local_experts, two_i, hidden_size = w13.shape
    shape = shape_key(local_experts, hidden_size, two_i // 2, topk, w13.dtype)
    tuned = configs.lookup("moe_gemm", validate_config, configs.device_name(w13.device), shape, num_tokens)
    if tuned is not None:
        return tuned
    routed = local_experts if num_experts is None else num_experts
    arch, sms = device_arch(w13.device), device_sms(w13.device)
    return heuristic_config(num_tokens, topk, routed, hidden_size, two_i // 2, w13.dtype, arch, sms)


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


def _file_archs(path) -> tuple[int, ...]:
    """The arch families a tuned file's device name stands for (Hopper parts: 90; Ampere: 80; else both)."""
    name = Path(path).stem
    if re.search(r"(^|_)(GH|H)\d+", name):
        return (90,)
    return (80,) if re.search(r"(^|_)A\d+", name) else DEFAULT_ARCHS


def _launch_configs() -> list[tuple[torch.dtype, dict, tuple[int, ...]]]:
    """(dtype, config, archs) of every GEMM config the launcher can pick: the heuristic's for each arch family (every
    decode N tile it can choose), then each tuned file's (every device, every search directory)."""
    found = []
    for dtype, arch, block_m in itertools.product(DTYPES.values(), DEFAULT_ARCHS, BLOCK_SIZES):
        for decode_tiles in itertools.product(DECODE_N, repeat=2) if block_m == 16 else [(64, 64)]:
            found.append((dtype, {"BLOCK_M": block_m, **_config(block_m, dtype, arch, decode_tiles)}, (arch,)))
    for path, shape, _, entry in configs.entries("moe_gemm", validate_config):
        found.append((parse_shape_key(shape)["dtype"], entry, _file_archs(path)))
    return list({(dtype, repr(config), archs): (dtype, config, archs) for dtype, config, archs in found}.values())


def _example_launch(model: str, dtype: torch.dtype, config: dict, num_tokens: int, weights: torch.dtype,
                    activation: str, quant: tuple = (None, None, False)) -> None:  # fmt: skip
    """fused_experts on meta tensors of `model`'s layer shape (MODEL_SHAPES) with `config`; quant: (weight dtype,
    block_shape, w8a8) of quantized experts (QUANT_KINDS), or unquantized."""
    num_experts, hidden_size, inter_size, topk = MODEL_SHAPES[model]
    num_pairs, block_m = num_tokens * topk, config["BLOCK_M"]
    padded = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    meta = {"device": META}
    weight_dtype, block_shape, w8a8 = quant
    shapes = (num_experts, 2 * inter_size, hidden_size), (num_experts, hidden_size, inter_size)
    w13, w2 = (torch.empty(shape, dtype=weight_dtype or dtype, **meta) for shape in shapes)
    scales = {}
    if weight_dtype is not None:  # fp8: [E, ceil(N/bn), ceil(K/bk)]; int8: [E, N]
        scale_shapes = [(e, n) if block_shape is None else (e, -(-n // block_shape[0]), -(-k // block_shape[1]))
                        for e, n, k in shapes]  # fmt: skip
        w13_scale, w2_scale = (torch.empty(shape, dtype=torch.float32, **meta) for shape in scale_shapes)
        scales = {"w13_scale": w13_scale, "w2_scale": w2_scale, "block_shape": block_shape, "w8a8": w8a8}
    fused_experts(
        torch.empty(num_tokens, hidden_size, dtype=dtype, **meta),
        w13,
        w2,
        torch.empty(num_tokens, topk, dtype=weights, **meta),
        torch.empty(padded, dtype=torch.int32, **meta),
        torch.empty(triton.cdiv(padded, block_m), dtype=torch.int32, **meta),
        torch.empty(1, dtype=torch.int32, **meta),
        config,
        activation=activation,
        **scales,
    )


def gemm_specs(dtype: torch.dtype, config: dict, archs: tuple[int, ...] = DEFAULT_ARCHS) -> list[CompileSpec]:
    """The launches of fused_experts with one config (silu and gelu, fp32 and model-dtype routing weights, odd and
    even T) at every MODEL_SHAPES shape: its gate_up, down and combine kernels as launched."""
    specs = []
    for model, num_tokens, weights, activation in itertools.product(
        MODEL_SHAPES, (1, 2), dict.fromkeys((torch.float32, dtype)), ("silu", "gelu")
    ):
        label = f"{model} T={num_tokens} M={config['BLOCK_M']}"
        launch = functools.partial(_example_launch, model, dtype, config, num_tokens, weights, activation)
        specs += launches(launch, label, archs)
    return specs


# (weight dtype, block_shape, w8a8) of each kind of quantized launch: fp8 at the checkpoints' [128, 128] (scales per
# tile), fp8 with a bk no BLOCK_K divides (per-element tiles), int8, and fp8 w8a8 (16-bit activations, sm_90 only).
QUANT_KINDS = (
    (torch.float8_e4m3fn, [128, 128], False),
    (torch.float8_e4m3fn, [128, 96], False),
    (torch.int8, None, False),
    (torch.float8_e4m3fn, [128, 128], True),
)


def _quantized_specs() -> list[CompileSpec]:
    """The launches of fused_experts with quantized experts: every QUANT_KINDS kind at the heuristic's tiles of every
    BLOCK_M (moe_gemm_quant.quant_tiles; launch_tiles' fp32 and per-element swaps), silu and gelu, at every
    MODEL_SHAPES shape, for sm_80 and sm_90 (w8a8: sm_90)."""
    specs = []
    for dtype, block_m, kind, model, activation in itertools.product(
        DTYPES.values(), BLOCK_SIZES, QUANT_KINDS, MODEL_SHAPES, ("silu", "gelu")
    ):
        weight_dtype, _, w8a8 = kind
        if w8a8 and dtype == torch.float32:
            continue
        config = {"BLOCK_M": block_m, **_config(block_m, weight_dtype, 90)}
        label = f"{model} T=1 M={block_m} {str(weight_dtype).removeprefix('torch.')}" + (" w8a8" if w8a8 else "")
        launch = functools.partial(_example_launch, model, dtype, config, 1, torch.float32, activation, kind)
        specs += launches(launch, label, (90,) if w8a8 else DEFAULT_ARCHS)
    return [spec for spec in specs if spec.kernel is not _quantize_groups_kernel]  # moe_gemm_quant checks it


def compile_specs() -> list[CompileSpec]:
    specs = [spec for dtype, config, archs in _launch_configs() for spec in gemm_specs(dtype, config, archs)]
    return specs + _quantized_specs()
