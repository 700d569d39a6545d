"""Quantized experts for the Triton grouped GEMM (kernels/moe_gemm.py): weight formats, the in-register dequantization,
the per-token-group fp8 quantization of activations (w8a8) and the choice between w8a16 and w8a8.

Formats (qwen_fast's quantized-experts contract; the weight dtype tells the format, the same for w13 and w2):
    fp8 block-scaled: w float8_e4m3fn [E, N, K], scale fp32 [E, ceil(N/bn), ceil(K/bk)], block_shape [bn, bk];
        W[e, n, k] = float(w[e, n, k]) * scale[e, n // bn, k // bk]. Any bn, bk >= 1 (partial last blocks too).
    int8 per output channel: w int8 [E, N, K], scale fp32 [E, N]; W[e, n, k] = float(w[e, n, k]) * scale[e, n].
The GEMM kernels read both as one layout, scale[e, n // bn, k // bk] through (stride_se, stride_sn, stride_sk): int8
is bn = 1, bk = K with stride_sk = 0 (scale_layout()).

w8a16 (every GPU, and the interpreter): the weight tile [BLOCK_K, BLOCK_N] is loaded as 1-byte codes (fp8 as its
uint8 bits: sm_80 has no e4m3 conversion, so kv_cache._e4m3_value decodes the bits in integer arithmetic), decoded to
fp32 (exact), multiplied by its fp32 scale (the reference's product, bit for bit) and rounded to the activation
dtype: the reference's dequantized weight, in registers. tl.dot then runs in the activation dtype with fp32
accumulation, as for unquantized weights. When bk is a multiple of BLOCK_K (SCALE_K_TILE: every K tile lies in one
scale block; int8 always) the scales of a tile are one vector [BLOCK_N]; otherwise (a block shape no checkpoint
uses) they are gathered per element, with BLOCK_K 16 tiles (launch_tiles).

w8a8 (fp8 weights, fp16/bf16 activations, CUDA capability >= 9.0, bk a multiple of both GEMMs' BLOCK_K >= 32;
uses_w8a8()): DeepGEMM's and vLLM's scheme, which is also what transformers' FP8 layers run on GPU. Each GEMM's
activations (hidden_states, then the intermediate) are quantized per row and per group of bk columns by
_quantize_groups_kernel: scale = max(amax, 1e-10) / 448, q = e4m3(clamp(x / scale, -448, 448)) rounded to nearest
even (kv_cache._e4m3_bits, exact on every target and under the interpreter). The GEMM loads both operands as fp8,
runs tl.dot on the fp8 tensor cores per K tile and adds dot * a_scale[row] * w_scale[col] to the fp32 accumulator
(a K tile lies in one group, so both scales are constant over it). The result differs from the w8a16 reference by
the activation rounding (e4m3 keeps 3 mantissa bits); its reference is qwen_fast/reference/moe_w8a8.py. Anywhere the
conditions fail (sm_80, fp32 activations, a bk no tile divides) the launcher runs w8a16.
"""

import torch
import triton
import triton.language as tl

from .compile_spec import META, CompileSpec, launches
from .kv_cache import _e4m3_bits, _e4m3_value

FP8_MAX = tl.constexpr(448.0)  # float8_e4m3fn's largest finite value (a constexpr: read in kernels)
WEIGHT_FORMATS = {torch.float8_e4m3fn: 1, torch.int8: 2}  # WEIGHTS constexpr of the GEMM kernels; 0: unquantized
W8A8_MIN_BLOCK_K = 32  # the K of one fp8 MMA instruction


@triton.jit
def _scales(base, scale_rows, k0, ks, col_ok, b_mask, stride_sn, stride_sk, scale_bk, SCALE_K_TILE: tl.constexpr):
    """The fp32 scales of the weight tile at K offset k0 with rows scale_rows (= n // bn) [BLOCK_N]: [1, BLOCK_N]
    when the tile lies in one K block (SCALE_K_TILE), else [BLOCK_K, BLOCK_N] gathered per element. 0 where masked."""
    if SCALE_K_TILE:
        scales = tl.load(base + scale_rows * stride_sn + (k0 // scale_bk) * stride_sk, mask=col_ok, other=0.0)
        scales = scales[None, :]
    else:
        k_blocks = (k0 + ks) // scale_bk
        offsets = scale_rows[None, :] * stride_sn + k_blocks[:, None] * stride_sk
        scales = tl.load(base + offsets, mask=b_mask, other=0.0)
    return scales


@triton.jit
def _dequantize(codes, scales, WEIGHTS: tl.constexpr):
    """fp32 weights from 1-byte codes (WEIGHTS 1: float8_e4m3fn bits as uint8; 2: int8) times their fp32 scales."""
    if WEIGHTS == 1:
        values = _e4m3_value(codes)
    else:
        values = codes.to(tl.float32)
    return values * scales


@triton.jit
def _quantize_groups_kernel(x, codes, scales, width, stride_x, group, BLOCK_G: tl.constexpr):
    """Program (r, g): row r, columns [g * group, (g + 1) * group) of x [R, width] -> e4m3 codes [R, width] (uint8)
    and scales [R, num_groups] fp32."""
    row = tl.program_id(0).to(tl.int64)
    index = tl.program_id(1)
    offsets = tl.arange(0, BLOCK_G)
    cols = index * group + offsets
    ok = (offsets < group) & (cols < width)
    values = tl.load(x + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(values), axis=0), 1e-10) / FP8_MAX
    quantized = tl.minimum(tl.maximum(values / scale, -FP8_MAX), FP8_MAX)
    tl.store(codes + row * width + cols, _e4m3_bits(quantized), mask=ok)
    tl.store(scales + row * tl.num_programs(1) + index, scale)


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] fp16/bf16 (rows K-contiguous) -> (codes float8_e4m3fn [R, K], scales fp32 [R, ceil(K/group)]), per
    row and per group of `group` columns: x ~= codes * scales[:, k // group]."""
    rows, width = x.shape
    num_groups = triton.cdiv(width, group)
    codes = torch.empty(rows, width, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(rows, num_groups, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_groups_kernel[(rows, num_groups)](
            x, codes.view(torch.uint8), scales, width, x.stride(0), group, BLOCK_G=triton.next_power_of_2(group)
        )
    return codes, scales


def scale_layout(weights: int, scale: torch.Tensor, block_shape, width: int) -> dict:
    """The GEMM kernels' scale arguments for weights of format `weights` (WEIGHT_FORMATS) over K = width:
    {"stride_se", "stride_sn", "stride_sk", "scale_bn", "scale_bk"} (int8 per channel: bn = 1, bk = K, no K
    stride)."""
    if weights == WEIGHT_FORMATS[torch.int8]:
        return {"stride_se": scale.stride(0), "stride_sn": scale.stride(1), "stride_sk": 0, "scale_bn": 1,
                "scale_bk": width}  # fmt: skip
    bn, bk = block_shape
    return {"stride_se": scale.stride(0), "stride_sn": scale.stride(1), "stride_sk": scale.stride(2),
            "scale_bn": bn, "scale_bk": bk}  # fmt: skip


def uses_w8a8(hidden_states: torch.Tensor, w13: torch.Tensor, block_shape, config: dict) -> bool:
    """Whether fused_experts runs w8a8 (module docstring) for these arguments and tiles, else w8a16."""
    if w13.dtype != torch.float8_e4m3fn or hidden_states.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not w13.is_cuda or torch.cuda.get_device_capability(w13.device) < (9, 0):
        return False
    block_ks = [config[gemm]["BLOCK_K"] for gemm in ("gate_up", "down")]
    return all(k >= W8A8_MIN_BLOCK_K and block_shape[1] % k == 0 for k in block_ks)


# 16-bit activations: (BLOCK_N, BLOCK_K, num_warps) of gate_up and of down per BLOCK_M, 3 stages (quant_tiles).
TILES_16BIT = {
    16: ((32, 64, 4), (64, 64, 4)),
    32: ((32, 64, 4), (64, 64, 4)),
    64: ((32, 64, 8), (128, 64, 8)),
    128: ((64, 32, 8), (64, 64, 4)),
}


def quant_tiles(block_m: int, dtype: torch.dtype, per_element: bool = False) -> dict:
    """GEMM tiles for 1-byte weights and `dtype` activations: {"gate_up": ..., "down": ...}, BLOCK_M past 128 as 128.
    The dequantized weight tile lives in registers (BLOCK_K x BLOCK_N values per CTA), so the tiles are smaller than
    unquantized ones. 16-bit (TILES_16BIT): BLOCK_K 64 (divides the checkpoints' bk = 128, so w8a8 applies), 32 for
    gate_up at BLOCK_M 128; gate_up holds two accumulators, so N 32 (64 spilled on sm_80 at BLOCK_M 64) but 64 at
    BLOCK_M 128 with K 32 (K 64 spilled with 4 and 8 warps); down N 64, 128 at BLOCK_M 64 (128 spilled at BLOCK_M
    128 in w8a8, where the dot result sits beside the accumulator). fp32 ("ieee" FMA dot products): N 32, K 32 at
    BLOCK_M 16 and 16 above, N 16 at BLOCK_M 128. per_element (a bk no BLOCK_K divides: scales gathered per weight):
    BLOCK_K 16."""
    if dtype == torch.float32:
        warps = 4 if block_m <= 32 else 8
        n, k = (16 if block_m >= 128 else 32), (32 if block_m <= 16 else 16)
        gate_up = down = {"BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": 2}
    else:
        row = TILES_16BIT[next((m for m in TILES_16BIT if block_m <= m), 128)]
        gate_up, down = ({"BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": 3} for n, k, w in row)
    if per_element:
        gate_up, down = ({**tiles, "BLOCK_K": 16} for tiles in (gate_up, down))
    return {"gate_up": gate_up, "down": down}


def launch_tiles(config: dict, dtype: torch.dtype, weights: int, block_shape) -> tuple[dict, bool]:
    """(tiles, per_element) of a launch with weights of format `weights`: config's tiles, except for 1-byte weights
    with fp32 activations (quant_tiles' fp32 tiles; choose_config() sees only w13) or an fp8 bk that a BLOCK_K of
    config does not divide (per_element: quant_tiles' per-element tiles, scales gathered per weight, the kernels'
    SCALE_K_TILE False), at config's BLOCK_M."""
    block_m = config["BLOCK_M"]
    per_element = weights == WEIGHT_FORMATS[torch.float8_e4m3fn] and any(
        block_shape[1] % config[gemm]["BLOCK_K"] for gemm in ("gate_up", "down")
    )
    if weights and (dtype == torch.float32 or per_element):
        return {"BLOCK_M": block_m, **quant_tiles(block_m, dtype, per_element)}, per_element
    return config, per_element


def compile_specs() -> list[CompileSpec]:
    """quantize_groups as w8a8 fused_experts launches it (sm_90): fp16/bf16 hidden states and intermediates of the
    Qwen3-MoE layer widths (2048, 768, 4096, 1536), groups of 128."""
    specs = []
    for dtype in (torch.float16, torch.bfloat16):
        for width in (2048, 768, 4096, 1536):
            x = torch.empty(8, width, dtype=dtype, device=META)
            specs += launches(lambda x=x: quantize_groups(x, 128), f"{dtype} width={width}", (90,))
    return specs
