"""Triton rotary_embedding and qk_norm_rope_and_cache: RoPE, optionally fused with Qwen3's per-head q/k RMSNorm and
the paged KV-cache write, in one pass over the new q/k.

Algorithm: program (t, g) owns token t and a group of BLOCK_H heads: groups [0, ceil(Hq / BLOCK_H)) are query heads,
the rest key heads. It loads its token's cos/sin halves once ([BLOCK_HALF] fp32 each, BLOCK_HALF = D/2 rounded up to a
power of two, masked) and its heads as two [BLOCK_H, BLOCK_HALF] tiles, the pair elements (x[i], x[i + D/2]) for neox
and (x[2i], x[2i + 1]) for interleaved pairs. In registers: the two tiles in fp32, the per-row sum of squares (both
tiles), the rotated tiles. It writes the rotated rows to the (contiguous) outputs; a key program with a non-negative
slot also writes them to key_cache and copies its value rows to value_cache at page slot // block_size, row
slot % block_size. Nothing is read twice; each byte of q, k, v is read once and each output byte written once.

Roundings (the references' contract, see csrc/rope.h): the norm runs in fp32 and is rounded to the input dtype, the
weight product rounded to it again; the rotation runs in fp32 with one final rounding for an fp32 cos/sin table, or,
for a table in the input dtype (ROUND_EACH), with every product and sum rounded to that dtype as the reference does.

Why BLOCK_H = 4: one Qwen3 KV group (Hkv = 4) per key program, Hq / 4 query programs per token; a [4, 64] fp32 tile
pair is 16 registers per thread at 2 warps, far from spilling. Offsets are int64 (token * strides, slot * strides).
Every input is read through its strides except the last (head) dims and the [D] norm weights, which must be
contiguous: positions and slot_mapping may be strided or expanded views (a stride-0 positions row shared by a batch
is what GQAAttention passes), cos_sin_cache rows may be spaced.

CUDA devices run both this kernel and the extension's CUDA kernel (csrc/cuda/rope.cu, warp per head row, the CPU
kernel's per-row code); `auto` prefers the CUDA one, like the other small latency-bound ops.
"""

import functools
import itertools

import torch
import triton
import triton.language as tl

from .compile_spec import META, CompileSpec, launches

BLOCK_H = 4


@triton.jit
def _norm_rope_tile(x, rows, row_mask, first, second, pair_mask, weight, cos, sin, eps, HEAD_DIM: tl.constexpr,
                    NORM: tl.constexpr, ROUND_EACH: tl.constexpr):  # fmt: skip
    """Rotated (out1, out2) [BLOCK_H, BLOCK_HALF] in x's dtype of the rows at offsets `rows` of x, normalized first
    when NORM."""
    mask = row_mask[:, None] & pair_mask[None, :]
    x1 = tl.load(x + rows[:, None] + first[None, :], mask=mask, other=0.0)
    x2 = tl.load(x + rows[:, None] + second[None, :], mask=mask, other=0.0)
    dtype = x1.dtype
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:
        sum_squares = tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)
        inv_rms = (1.0 / tl.sqrt_rn(sum_squares / HEAD_DIM + eps))[:, None]
        w1 = tl.load(weight + first, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(weight + second, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
        a = (w1 * (a * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        b = (w2 * (b * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    c, s = cos[None, :], sin[None, :]
    if ROUND_EACH:
        out1 = (a * c).to(dtype).to(tl.float32) - (b * s).to(dtype).to(tl.float32)
        out2 = (b * c).to(dtype).to(tl.float32) + (a * s).to(dtype).to(tl.float32)
    else:
        out1 = a * c - b * s
        out2 = b * c + a * s
    return out1.to(dtype), out2.to(dtype)


@triton.jit
def _rope_kernel(
    positions, query, key, value, q_weight, k_weight, cos_sin, query_out, key_out, key_cache, value_cache,
    slot_mapping, positions_stride, slot_stride, cos_sin_stride, q_token_stride, q_head_stride, k_token_stride,
    k_head_stride, v_token_stride, v_head_stride, block_stride, page_stride, cache_head_stride, block_size,
    num_q_heads, num_kv_heads, eps,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, IS_NEOX: tl.constexpr,
    FUSED: tl.constexpr, ROUND_EACH: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    q_groups = tl.cdiv(num_q_heads, BLOCK_H)
    half: tl.constexpr = HEAD_DIM // 2
    pair = tl.arange(0, BLOCK_HALF)
    pair_mask = pair < half
    if IS_NEOX:
        first, second = pair, pair + half
    else:
        first, second = 2 * pair, 2 * pair + 1
    table = cos_sin + tl.load(positions + token * positions_stride) * cos_sin_stride
    cos = tl.load(table + pair, mask=pair_mask, other=0.0).to(tl.float32)
    sin = tl.load(table + half + pair, mask=pair_mask, other=0.0).to(tl.float32)
    if group < q_groups:
        heads = (group * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        row_mask = heads < num_q_heads
        rows = token * q_token_stride + heads * q_head_stride
        out1, out2 = _norm_rope_tile(query, rows, row_mask, first, second, pair_mask, q_weight, cos, sin, eps,
                                     HEAD_DIM, FUSED, ROUND_EACH)  # fmt: skip
        out_rows = (token * num_q_heads + heads)[:, None] * HEAD_DIM
        mask = row_mask[:, None] & pair_mask[None, :]
        tl.store(query_out + out_rows + first[None, :], out1, mask=mask)
        tl.store(query_out + out_rows + second[None, :], out2, mask=mask)
    else:
        heads = ((group - q_groups) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
        row_mask = heads < num_kv_heads
        rows = token * k_token_stride + heads * k_head_stride
        out1, out2 = _norm_rope_tile(key, rows, row_mask, first, second, pair_mask, k_weight, cos, sin, eps,
                                     HEAD_DIM, FUSED, ROUND_EACH)  # fmt: skip
        out_rows = (token * num_kv_heads + heads)[:, None] * HEAD_DIM
        mask = row_mask[:, None] & pair_mask[None, :]
        tl.store(key_out + out_rows + first[None, :], out1, mask=mask)
        tl.store(key_out + out_rows + second[None, :], out2, mask=mask)
        if FUSED:
            slot = tl.load(slot_mapping + token * slot_stride)
            if slot >= 0:
                page = (slot // block_size) * block_stride + (slot % block_size) * page_stride
                cache_rows = (page + heads * cache_head_stride)[:, None]
                tl.store(key_cache + cache_rows + first[None, :], out1, mask=mask)
                tl.store(key_cache + cache_rows + second[None, :], out2, mask=mask)
                value_rows = (token * v_token_stride + heads * v_head_stride)[:, None]
                v1 = tl.load(value + value_rows + first[None, :], mask=mask)
                v2 = tl.load(value + value_rows + second[None, :], mask=mask)
                tl.store(value_cache + cache_rows + first[None, :], v1, mask=mask)
                tl.store(value_cache + cache_rows + second[None, :], v2, mask=mask)


def _config(head_dim: int) -> dict:
    block_half = triton.next_power_of_2(max(head_dim // 2, 1))
    tile = BLOCK_H * block_half
    return {"BLOCK_HALF": block_half, "num_warps": 1 if tile <= 128 else 2 if tile <= 256 else 4}


def _launch(positions, query, key, cos_sin_cache, is_neox, value=None, q_weight=None, k_weight=None, eps=0.0,
            key_cache=None, value_cache=None, slot_mapping=None):  # fmt: skip
    """Both ops; the fused one when value is given. Absent tensors are passed as unused dummies."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    query_out, key_out = (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty_like(key, memory_format=torch.contiguous_format),
    )
    groups = triton.cdiv(num_q_heads, BLOCK_H) + triton.cdiv(num_kv_heads, BLOCK_H)
    if num_tokens == 0 or groups == 0:
        return query_out, key_out
    fused = value is not None
    if not fused:
        value, q_weight, k_weight, key_cache, value_cache, slot_mapping = query, query, query, query, query, positions
    cache_strides = key_cache.stride()[:3] if fused else (0, 0, 0)
    config = _config(head_dim)
    _rope_kernel[(num_tokens, groups)](
        positions, query, key, value, q_weight, k_weight, cos_sin_cache, query_out, key_out, key_cache, value_cache,
        slot_mapping, positions.stride(0), slot_mapping.stride(0), cos_sin_cache.stride(0), query.stride(0),
        query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1), *cache_strides,
        key_cache.shape[1] if fused else 1, num_q_heads, num_kv_heads, eps,
        HEAD_DIM=head_dim, BLOCK_HALF=config["BLOCK_HALF"], BLOCK_H=BLOCK_H, IS_NEOX=is_neox, FUSED=fused,
        ROUND_EACH=cos_sin_cache.dtype != torch.float32, num_warps=config["num_warps"],
    )  # fmt: skip
    return query_out, key_out


def rotary_embedding(positions, query, key, cos_sin_cache, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher; arguments as qwen_fast.rotary_embedding with [T, H, D] query/key and [T] positions (checked there)."""
    return _launch(positions, query, key, cos_sin_cache, is_neox)


def qk_norm_rope_and_cache(query, key, value, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, key_cache,
                           value_cache, slot_mapping, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launcher; arguments as qwen_fast.qk_norm_rope_and_cache (checked there). Mutates key_cache and value_cache."""
    return _launch(positions, query, key, cos_sin_cache, is_neox, value, q_norm_weight, k_norm_weight, eps, key_cache,
                   value_cache, slot_mapping)  # fmt: skip


def _example_launch(dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int, is_neox: bool, fused: bool) -> None:
    """rotary_embedding, or the fused q/k-norm + RoPE + page write, on meta tensors: 32 query and 4 KV heads sliced
    from one fused qkv projection (as a model passes them), 16-token pages."""
    num_tokens, heads_q, heads_kv, meta = 3, 32, 4, {"device": META}
    qkv = torch.empty(num_tokens, (heads_q + 2 * heads_kv) * head_dim, dtype=dtype, **meta)
    query = qkv[:, : heads_q * head_dim].view(num_tokens, heads_q, head_dim)
    key, value = (
        qkv[:, (heads_q + i * heads_kv) * head_dim :][:, : heads_kv * head_dim].view(num_tokens, heads_kv, head_dim)
        for i in (0, 1)
    )
    positions = torch.empty(num_tokens, dtype=torch.int64, **meta)
    cos_sin = torch.empty(4096, head_dim, dtype=cache_dtype, **meta)
    if not fused:
        rotary_embedding(positions, query, key, cos_sin, is_neox)
        return
    weights = [torch.empty(head_dim, dtype=dtype, **meta) for _ in range(2)]
    caches = [torch.empty(64, 16, heads_kv, head_dim, dtype=dtype, **meta) for _ in range(2)]
    slots = torch.empty(num_tokens, dtype=torch.int64, **meta)
    qk_norm_rope_and_cache(query, key, value, *weights, 1e-6, positions, cos_sin, *caches, slots, is_neox)


def compile_specs() -> list[CompileSpec]:
    """The launches for each (dtype, cos/sin cache dtype) pair, head dim, rotation style, plain or fused."""
    specs = []
    pairs = [(torch.float32, torch.float32)] + [
        (d, c) for d in (torch.float16, torch.bfloat16) for c in (torch.float32, d)
    ]
    for (dtype, cache_dtype), head_dim, is_neox, fused in itertools.product(
        pairs, (64, 128, 256), (True, False), (True, False)
    ):
        label = f"cos_sin {str(cache_dtype).removeprefix('torch.')} D={head_dim}"
        launch = functools.partial(_example_launch, dtype, cache_dtype, head_dim, is_neox, fused)
        specs += launches(launch, label)
    return specs
