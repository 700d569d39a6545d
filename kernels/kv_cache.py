"""Triton reshape_and_cache: write new K/V rows into the paged caches.

Algorithm: program (t, h) owns token t's head h, a row of D elements. It reads slot = slot_mapping[t]; a negative
slot is padding and the program exits. Otherwise the row goes to block slot // block_size, offset
slot % block_size, of key_cache and value_cache [num_blocks, block_size, Hkv, D]. The row is loaded into registers
as one BLOCK_D vector (D rounded up to a power of two, masked) and stored; nothing else is held. Offsets are
computed in int64 (slot * strides passes 2^31 for large pools). key, value and the two caches are each read through
their own strides (head dims contiguous), so key and value may be slices of one fused projection and the caches
views of one interleaved buffer; slot_mapping is made contiguous by the launcher (N int64, a copy only when strided).
FP8 (vLLM's kv_cache_dtype "fp8"): the caches are float8_e4m3fn and each element is stored as x / scale (fp32
division, k_scale / v_scale read from one-element fp32 tensors), clamped to +-448 (e4m3's largest finite value,
vLLM's saturating conversion), rounded to nearest even and encoded by _e4m3_bits in integer arithmetic (the caches
are passed as their uint8 bits).
"""

import functools
import itertools

import torch
import triton
import triton.language as tl

from .compile_spec import META, CompileSpec, launches


@triton.jit
def _e4m3_bits(x):
    """The float8_e4m3fn bits (uint8) of x (fp32, |x| <= 448) rounded to nearest even, in integer arithmetic: Triton
    has no e4m3 cast on sm_80, and its interpreter drops the carry when a cast's rounding crosses a power of two.
    Normal values (|x| >= 2^-6) keep 3 mantissa bits (the rounding carries into the exponent), subnormals are
    multiples of 2^-9 (1.5 * 2^23 forces the rounding)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000  # |x| on e4m3's normal grid, as fp32 bits
    normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)  # exponent rebiased 127 -> 7, 3 mantissa bits
    subnormal = ((tl.abs(x) * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)
    code = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
    return (((bits >> 24) & 0x80) | code).to(tl.uint8)


@triton.jit
def _e4m3_value(code):
    """fp32 value of float8_e4m3fn bits (uint8; the caches never hold the NaN code 0x7F / 0xFF): built from the bits
    for normal codes, m * 2^-9 for subnormals (exponent 0)."""
    bits = code.to(tl.int32)
    exponent, mantissa = (bits >> 3) & 15, bits & 7
    normal = (((bits & 0x80) << 24) | ((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    subnormal = mantissa.to(tl.float32) * 0.001953125
    return tl.where(exponent == 0, tl.where((bits & 0x80) != 0, -subnormal, subnormal), normal)


@triton.jit
def _reshape_and_cache_kernel(
    key,
    value,
    key_cache,
    value_cache,
    slot_mapping,
    k_scale,
    v_scale,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    kc_block_stride,
    kc_page_stride,
    kc_head_stride,
    vc_block_stride,
    vc_page_stride,
    vc_head_stride,
    block_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping + token)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        dims = tl.arange(0, BLOCK_D)
        mask = dims < HEAD_DIM
        k_src = token * k_token_stride + head * k_head_stride + dims
        k_dst = block * kc_block_stride + offset * kc_page_stride + head * kc_head_stride + dims
        k_row = tl.load(key + k_src, mask=mask)
        if FP8:
            k_row = _e4m3_bits(tl.minimum(tl.maximum(k_row.to(tl.float32) / tl.load(k_scale), -448.0), 448.0))
        tl.store(key_cache + k_dst, k_row.to(key_cache.dtype.element_ty), mask=mask)
        v_src = token * v_token_stride + head * v_head_stride + dims
        v_dst = block * vc_block_stride + offset * vc_page_stride + head * vc_head_stride + dims
        v_row = tl.load(value + v_src, mask=mask)
        if FP8:
            v_row = _e4m3_bits(tl.minimum(tl.maximum(v_row.to(tl.float32) / tl.load(v_scale), -448.0), 448.0))
        tl.store(value_cache + v_dst, v_row.to(value_cache.dtype.element_ty), mask=mask)


def _config(head_dim: int) -> dict:
    block_d = triton.next_power_of_2(head_dim)
    return {"BLOCK_D": block_d, "num_warps": 1 if block_d <= 128 else 2}


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Launcher; arguments as qwen_fast.reshape_and_cache (checked there; with k_scale/v_scale the caches are
    float8_e4m3fn). Mutates key_cache and value_cache."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    config = _config(head_dim)
    if k_scale is not None:  # the kernel writes e4m3 bits
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    _reshape_and_cache_kernel[(num_tokens, num_heads)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping.contiguous(),  # the kernel reads slot t at offset t
        slot_mapping if k_scale is None else k_scale,  # read only with FP8
        slot_mapping if v_scale is None else v_scale,
        *key.stride()[:2],
        *value.stride()[:2],
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        key_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=config["BLOCK_D"],
        FP8=k_scale is not None,
        num_warps=config["num_warps"],
    )


def _example_launch(dtype: torch.dtype, head_dim: int, fp8: bool, fused_projection: bool) -> None:
    """reshape_and_cache on meta tensors: 8 KV heads, 16-token pages; key and value contiguous, or slices of one
    fused qkv projection (32 query heads), as a model passes them."""
    num_tokens, heads, meta = 3, 8, {"device": META}
    if fused_projection:
        qkv = torch.empty(num_tokens, (32 + 2 * heads) * head_dim, dtype=dtype, **meta)
        key, value = (qkv[:, (32 + i * heads) * head_dim :][:, : heads * head_dim] for i in (0, 1))
        key, value = key.view(num_tokens, heads, head_dim), value.view(num_tokens, heads, head_dim)
    else:
        key, value = (torch.empty(num_tokens, heads, head_dim, dtype=dtype, **meta) for _ in range(2))
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    caches = [torch.empty(64, 16, heads, head_dim, dtype=cache_dtype, **meta) for _ in range(2)]
    scales = [torch.empty(1, **meta) for _ in range(2)] if fp8 else [None, None]
    reshape_and_cache(key, value, *caches, torch.empty(num_tokens, dtype=torch.int64, **meta), *scales)


def compile_specs() -> list[CompileSpec]:
    """The launches for each dtype and head dim, with and without an fp8 cache, from contiguous and sliced K/V."""
    specs = []
    for dtype, head_dim, fp8, fused in itertools.product(
        (torch.float32, torch.float16, torch.bfloat16), (64, 96, 128, 256), (False, True), (False, True)
    ):
        label = f"D={head_dim}" + (" fp8 cache" if fp8 else "") + (" qkv slices" if fused else "")
        specs += launches(functools.partial(_example_launch, dtype, head_dim, fp8, fused), label)
    return specs
