"""Triton paged attention: the queries of flash_attn_with_kvcache over a paged (or contiguous) KV cache.

Split-K ("flash-decoding", Dao et al. 2023): the context of each sequence is cut into `num_splits` slices that run in
parallel, each producing a partial softmax result, which a second kernel merges with log-sum-exp weights.

1. _attention_kernel, grid (B * m_tiles, Hkv, num_splits). Program (b * m_tiles + t, g, s) owns BLOCK_M query rows
   of sequence b and KV head g: row r = t * BLOCK_M + arange(BLOCK_M) of the Sq * G rows of the group (G = Hq / Hkv;
   row r is query i = r // G of head g * G + r % G), so the G heads sharing a KV head are processed together and every
   K/V page is read once per group when Sq * G <= BLOCK_M (16, or 32 for aligned 16-bit caches: decode at G 8 and 16;
   longer appends take several row tiles, each reading the group's K/V). BLOCK_M >= 16 for tl.dot; rows past Sq * G
   are padding (loaded as 0, never stored). Registers: the q tile [BLOCK_M, BLOCK_D] (q's dtype), the fp32
   accumulator [BLOCK_M, BLOCK_D], the running max and sum-exp [BLOCK_M], a K tile loaded transposed
   [BLOCK_D, BLOCK_N] and a V tile [BLOCK_N, BLOCK_D].
   Visible keys: the program's rows see keys in [lo, hi) (length L = seqlens[b], causal/window bounds of its first
   and last query, bottom-right aligned: query i sits at key d(i) = i + L - Sq). The range is cut into
   slices of max(cdiv(hi - lo, num_splits) rounded up to whole BLOCK_N tiles, MIN_SPLIT_KEYS) keys: the grid's
   num_splits is a bound known on the host, each program uses only the splits its sequence's real length needs,
   and the splits past them find an empty slice and write an lse of -inf. Each key tile gathers its rows by
   position: position p lives in page block_table[b, p // block_size] at row p % block_size, so a tile may span
   pages and any block_size >= 1 works (a contiguous cache is one page of S_max rows per sequence). (Loading the next
   tile's page numbers one tile ahead was tried: the carried numbers pushed ten configs past the register file in
   gpu_check.) Scores are fp32 (tl.dot), masked per (row, key) by the window, softmax online in base 2. With one
   split the program writes out = acc / sum (0 for a row with no visible key) in q's dtype; otherwise it writes the
   normalised partial output (fp32; 0 for a row that saw no key) and its log2-sum-exp (-inf when the slice had no
   visible key) to part_out [S, B, Sq, Hq, D] and part_lse [S, B, Sq, Hq].
   Keys before leftpad[b] (HAS_LEFTPAD) are invisible. SOFTCAP: the score is softcap * tanh(scale * q.k / softcap)
   (flash-attn's order: scale, then cap; tanh(x) = 1 - 2 / (exp(2x) + 1), exact at both ends), in base 2 after.
   With one split the program also writes the row's natural log-sum-exp to lse [B, Hq, Sq] (+inf without a key).
   FP8_KV: the caches hold float8_e4m3fn bits (passed as uint8; decoded by kv_cache._e4m3_value in integer
   arithmetic, exact in q's dtype, since Triton has no e4m3 type on sm_80); the scores are scaled by the
   (sequence, KV head)'s k_descale and the output by its v_descale (fp32 [B, Hkv]).
2. _merge_kernel, grid (B * Sq * Hq,): one output row, one pass over the splits, MERGE_SPLITS at a time (their lse
   and partial rows loaded together, merged with a running max as the online softmax does), skipping the splits
   that saw no key; 0 when none did; the merged log-sum-exp to lse [B, Hq, Sq].

num_splits (unless the caller forces it: flash-attn's num_splits > 0) comes from the shapes and a host-known bound on
the longest context (the caller's `max_seqlen_k`: flash_attn_with_kvcache's host-side lengths, PagedKVCache's plan,
flash_attn_func's Sk; else the cache capacity per sequence) and the SM count, never from cache_seqlens' device
values: no host synchronisation, so the launch can be captured in a CUDA graph; each program then adapts its split
count and slices to the sequence's actual length inside the kernel.

Chunked prefill (Sq * G > PREFILL_ROWS, e.g. a 512-token chunk onto a non-empty cache) is compute-shaped: row tiles
of 32 that each gather the whole context would re-read it per tile. With a host-known max_seqlen_k (and no
leftpad, no fp8) the launcher instead gathers each sequence's keys and values once into packed rows (device index
arithmetic, B * max_seqlen_k rows, no sync) and runs the prefill kernel (attention.paged_prefill: the varlen flash
attention, causal bottom-right per sequence), whose large query tiles read each key tile once per 64-128 rows.

Offsets are int64 (page * page stride passes 2^31 for large pools). Every tensor is read through its strides (head
dims contiguous): seqlens and block_table may be strided or expanded views (a stride-0 seqlens of one length, a
block table sliced out of a wider one). fp32 tl.dot uses input_precision "ieee".
Tiles (_config), each the largest that compiled without register spills on sm_80 and sm_90 (gpu_check; the gathered
K/V tiles hold one pointer per 16-byte vector, which costs registers that a dense flash-attention tile does not).
Given no register budget, ptxas caps a thread at an occupancy step (64, 80, 128, 168 registers for 128 threads) and
spills a few bytes past it; the warps below keep every config under those caps, and fp32 passes `maxnreg` (an
explicit budget: ptxas then allocates what the kernel needs, 64-128 registers, instead of spilling at 64 or 80).
16-bit caches whose rows start on 16 bytes (every contiguous cache of D % 8 == 0; the launcher checks and the kernel is
told with tl.multiple_of, so loads are 16-byte vectors): BLOCK_M 16 (Sq * G <= 16) x BLOCK_N 64 keys, or BLOCK_M 32
x BLOCK_N 32, halved BLOCK_N for D = 256; 8 warps for 32-row tiles at D >= 128, for fp8 caches at D >= 128 and at
D = 16 (4 spilled at 128, 168 and 96 registers); fp8 caches at D = 256 with more than 16 rows take 16 x 16 tiles
(32 x 16 and 16 x 32 spilled at 128 registers). fp32, or rows not 16-byte aligned (element loads): BLOCK_M 16 x
BLOCK_N 16 (the tl.dot minimum); fp32 with 8 warps, maxnreg 128, and one stage at D = 256 (two stages took 128+
registers there). Every config is listed in compile_specs() and compiled for sm_80 and sm_90 by
`python -m qwen_fast.gpu_check` (head dims 64, 128, 256).
"""

import functools
import itertools

import torch
import triton
import triton.language as tl

from .compile_spec import META, CompileSpec, launches
from .kv_cache import _e4m3_value

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): the kernels keep log-sum-exps in base 2
MIN_SPLIT_KEYS = 256  # a split below this many keys costs more in its partial write and merge than it saves
MIN_KEYS = tl.constexpr(MIN_SPLIT_KEYS)  # a multiple of every BLOCK_N
MAX_SPLITS = 64
PREFILL_ROWS = 64  # more rows (Sq * G) than this, with a host-known max_seqlen_k: the prefill kernel (see above)
MERGE_SPLITS = 16  # splits the merge reads per step: a [16, BLOCK_D] fp32 tile over 4 warps (16 registers a thread)


@triton.jit
def _attention_kernel(
    q,
    k_cache,
    v_cache,
    out,
    lse_out,
    part_out,
    part_lse,
    seqlens,
    block_table,
    leftpad,
    k_descale,
    v_descale,
    seqlen_q,
    group,
    num_splits,
    block_size,
    qk_scale,
    softcap,
    window_left,
    window_right,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kp,
    stride_kr,
    stride_kh,
    stride_vp,
    stride_vr,
    stride_vh,
    stride_sl,
    stride_bt,
    stride_bc,
    stride_lp,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    num_rows = seqlen_q * group
    m_tiles = tl.cdiv(num_rows, BLOCK_M)
    b = tl.program_id(0) // m_tiles
    tile = tl.program_id(0) % m_tiles
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads_q = tl.num_programs(1) * group
    batch = tl.num_programs(0) // m_tiles

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    query = rows // group
    head = kv_head * group + rows % group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_offs = b.to(tl.int64) * stride_qb + query.to(tl.int64) * stride_qs + head.to(tl.int64) * stride_qh
    q_tile = tl.load(q + q_offs[:, None] + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # Keys visible to row i: [d(i) - left, d(i) + right] within [0, L); the tile's range spans its first and last query.
    length = tl.load(seqlens + b * stride_sl)
    diagonal = query + length - seqlen_q
    first_query = (tile * BLOCK_M) // group
    last_query = (tl.minimum(tile * BLOCK_M + BLOCK_M, num_rows) - 1) // group
    first_key = 0
    if HAS_LEFTPAD:
        first_key = tl.load(leftpad + b * stride_lp)
    lo = tl.where(window_left >= 0, tl.maximum(first_query + length - seqlen_q - window_left, 0), 0)
    lo = tl.maximum(lo, first_key)
    hi = tl.where(window_right >= 0, tl.minimum(last_query + length - seqlen_q + window_right + 1, length), length)
    # Slices of at least MIN_KEYS keys (a multiple of BLOCK_N): the grid's num_splits is a bound from the host, and
    # the splits past this sequence's cdiv(hi - lo, chunk) find an empty slice (the merge skips them).
    chunk = tl.maximum(tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), num_splits), BLOCK_N) * BLOCK_N, MIN_KEYS)
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)
    lower = tl.maximum(tl.where(window_left >= 0, diagonal - window_left, 0), first_key)
    upper = tl.where(window_right >= 0, diagonal + window_right, length - 1)

    kv_scale = qk_scale
    if FP8_KV:
        kv_scale = qk_scale * tl.load(k_descale + b * tl.num_programs(1) + kv_head)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_table + b.to(tl.int64) * stride_bt
    for key_start in range(start, end, BLOCK_N):
        pos = key_start + tl.arange(0, BLOCK_N)
        key_ok = pos < end
        page = tl.load(table_row + (pos // block_size).to(tl.int64) * stride_bc, mask=key_ok, other=0).to(tl.int64)
        slot_row = (pos % block_size).to(tl.int64)
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k_rows = k_cache + (page * stride_kp + slot_row * stride_kr + kv_head * stride_kh)
        if ALIGNED:  # every row starts on 16 bytes (checked by the launcher): vector loads
            k_rows = tl.multiple_of(k_rows, 16)
        k_tile = tl.load(k_rows[None, :] + dims[:, None], mask=dim_ok[:, None] & key_ok[None, :], other=0)
        if FP8_KV:
            k_tile = _e4m3_value(k_tile).to(q_tile.dtype)
        scores = tl.dot(q_tile, k_tile, input_precision=DOT_PRECISION) * kv_scale
        if SOFTCAP:  # qk_scale = scale / softcap here, softcap = softcap * log2(e)
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores) + 1.0))
        visible = key_ok[None, :] & (pos[None, :] >= lower[:, None]) & (pos[None, :] <= upper[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: exp2(-inf) = 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_rows = v_cache + (page * stride_vp + slot_row * stride_vr + kv_head * stride_vh)
        if ALIGNED:
            v_rows = tl.multiple_of(v_rows, 16)
        v_tile = tl.load(v_rows[:, None] + dims[None, :], mask=kv_mask, other=0)
        if FP8_KV:
            v_tile = _e4m3_value(v_tile).to(q_tile.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    result = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that saw no key keep acc = 0
    if FP8_KV:
        result = result * tl.load(v_descale + b * tl.num_programs(1) + kv_head)
    out_row = (b.to(tl.int64) * seqlen_q + query) * num_heads_q + head  # row of the [B, Sq, Hq] output
    store_mask = row_ok[:, None] & dim_ok[None, :]
    log2_sum = m_i + tl.log2(tl.where(seen, l_i, 1.0))
    if num_splits == 1:
        tl.store(out + out_row[:, None] * HEAD_DIM + dims[None, :], result.to(out.dtype.element_ty), mask=store_mask)
        lse_row = (b.to(tl.int64) * num_heads_q + head) * seqlen_q + query  # row of the [B, Hq, Sq] lse
        tl.store(lse_out + lse_row, tl.where(seen, log2_sum * LN2, float("inf")), mask=row_ok)
    else:
        part_row = split.to(tl.int64) * batch * seqlen_q * num_heads_q + out_row
        tl.store(part_out + part_row[:, None] * HEAD_DIM + dims[None, :], result, mask=store_mask)
        tl.store(part_lse + part_row, tl.where(seen, log2_sum, float("-inf")), mask=row_ok)


@triton.jit
def _merge_kernel(
    part_out,
    part_lse,
    out,
    lse_out,
    num_rows,
    num_splits,
    seqlen_q,
    num_heads_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row (b * Sq + i) * Hq + h of the output
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    m = tl.full([], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    weight_sum = tl.zeros([], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):  # one pass: BLOCK_S splits' lse and partial rows loaded together
        splits = s0 + tl.arange(0, BLOCK_S)
        part_rows = splits.to(tl.int64) * num_rows + row
        lse = tl.load(part_lse + part_rows, mask=splits < num_splits, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp2(m - m_safe)
        weight = tl.exp2(lse - m_safe)  # 0 for a split that saw no key (its partial row is not read)
        seen = (lse > float("-inf"))[:, None] & dim_ok[None, :]
        parts = tl.load(part_out + part_rows[:, None] * HEAD_DIM + dims[None, :], mask=seen, other=0.0)
        acc = acc * rescale + tl.sum(weight[:, None] * parts, axis=0)
        weight_sum = weight_sum * rescale + tl.sum(weight, axis=0)
        m = m_new
    seen = weight_sum > 0.0
    result = acc / tl.where(seen, weight_sum, 1.0)
    tl.store(out + row * HEAD_DIM + dims, result.to(out.dtype.element_ty), mask=dim_ok)
    head = row % num_heads_q
    query = (row // num_heads_q) % seqlen_q
    b = row // num_heads_q // seqlen_q
    lse = (tl.where(seen, m, 0.0) + tl.log2(tl.where(seen, weight_sum, 1.0))) * LN2
    tl.store(lse_out + (b * num_heads_q + head) * seqlen_q + query, tl.where(seen, lse, float("inf")))


def _config(num_rows: int, head_dim: int, dtype: torch.dtype, aligned: bool, fp8: bool = False) -> dict:
    """Tiles, warps, stages and register budget (maxnreg, None: ptxas's choice) that compile without register
    spills on sm_80 and sm_90 (measured with gpu_check; see the header). An fp8 cache (aligned rows only) adds the
    decoded tiles: fp32 queries then take 4 warps and one stage."""
    block_d = triton.next_power_of_2(head_dim)
    wide_fp8 = fp8 and block_d > 128 and num_rows > 16  # 32 x 16 and 16 x 32 tiles spilled: 16 x 16
    block_m = 32 if num_rows > 16 and aligned and dtype != torch.float32 and not wide_fp8 else 16
    if dtype == torch.float32 or not aligned or wide_fp8:
        block_n = 16
    else:
        block_n = (64 if block_m == 16 else 32) // (2 if block_d > 128 else 1)
    maxnreg = None
    if dtype == torch.float32:  # ptxas's own register caps (64-80 a thread) spilled: 8 warps, an explicit budget
        num_warps, maxnreg = 8, 128
    elif block_d <= 16 or (block_d >= 128 and (block_m == 32 or fp8)):
        num_warps = 8
    else:
        num_warps = 4
    num_stages = 1 if dtype == torch.float32 and (not aligned or block_d > 128) else 2
    if fp8 and dtype == torch.float32:
        num_warps, num_stages, maxnreg = 4, 1, None
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "ALIGNED": aligned} | {
        "num_warps": num_warps,
        "num_stages": num_stages,
        "maxnreg": maxnreg,
    }


def _aligned(*caches: torch.Tensor) -> bool:
    """Whether every K/V row of the caches starts on a 16-byte boundary (then the kernel loads 16-byte vectors)."""
    return all(
        cache.data_ptr() % 16 == 0 and all(stride * cache.element_size() % 16 == 0 for stride in cache.stride()[:3])
        for cache in caches
    )


def num_splits(programs: int, max_context: int, num_sms: int) -> int:
    """Context splits per (row tile, KV head): enough programs for about two waves over the SMs, each split at least
    MIN_SPLIT_KEYS keys of `max_context`, a host-known bound on the longest context (the caller's maximum length, or
    the cache capacity: no host sync). The kernel then uses only the splits each sequence's real length needs."""
    if programs >= num_sms:
        return 1
    return max(1, min(triton.cdiv(2 * num_sms, programs), triton.cdiv(max_context, MIN_SPLIT_KEYS), MAX_SPLITS))


def _merge_block(splits: int) -> int:
    return min(triton.next_power_of_2(splits), MERGE_SPLITS)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so that small tests cover the merge


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    block_table: torch.Tensor,
    leftpad: torch.Tensor | None,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    splits: int,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher; arguments as qwen_fast.ops.paged_attention's paged_attention op (checked there). `splits` > 0
    overrides the heuristic (flash-attn's num_splits). `max_seqlen_k` > 0: a host-known bound on seqlens (keys per
    sequence), which sizes the split count (0: the block table's capacity). Returns new tensors: out [B, Sq, Hq, D]
    in q's dtype and the natural log-sum-exp lse fp32 [B, Hq, Sq]. With k_descale / v_descale (fp32 [B, Hkv],
    contiguous) the caches are float8_e4m3fn."""
    if k_descale is not None:  # the kernel decodes e4m3 bits
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    num_heads_kv = k_cache.shape[2]
    group = num_heads_q // num_heads_kv
    out = torch.empty(batch, seqlen_q, num_heads_q, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, num_heads_q, seqlen_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if seqlen_q * group > PREFILL_ROWS and max_seqlen_k > 0 and leftpad is None and k_descale is None:
        from .attention import paged_prefill  # attention.py imports this module

        return paged_prefill(q, k_cache, v_cache, seqlens, block_table, softmax_scale, window_left, window_right,
                             softcap, max_seqlen_k)  # fmt: skip
    aligned = _aligned(k_cache, v_cache)
    if k_descale is not None and not aligned:  # element-wise fp8 loads spill registers (gpu_check, sm_80, D=256)
        raise ValueError(
            f"the triton backend reads fp8 caches whose rows start on 16 bytes, got strides {k_cache.stride()} and "
            f"{v_cache.stride()} (use a contiguous cache with head_dim % 16 == 0, or another backend)"
        )
    config = _config(seqlen_q * group, head_dim, q.dtype, aligned, k_descale is not None)
    m_tiles = triton.cdiv(seqlen_q * group, config["BLOCK_M"])
    max_context = block_table.shape[1] * k_cache.shape[1]
    if max_seqlen_k > 0:
        max_context = min(max_context, max_seqlen_k)
    if splits <= 0:
        splits = num_splits(batch * num_heads_kv * m_tiles, max_context, _num_sms(q.device))
    if splits > 1:
        part_out = torch.empty(splits, batch, seqlen_q, num_heads_q, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(splits, batch, seqlen_q, num_heads_q, dtype=torch.float32, device=q.device)
    else:  # unused by the kernel; one element each keeps the pointer types of compile_specs()
        part_out = part_lse = torch.empty(1, dtype=torch.float32, device=q.device)
    _attention_kernel[(batch * m_tiles, num_heads_kv, splits)](
        q,
        k_cache,
        v_cache,
        out,
        lse,
        part_out,
        part_lse,
        seqlens,
        block_table,
        seqlens if leftpad is None else leftpad,  # read only with HAS_LEFTPAD
        seqlens if k_descale is None else k_descale,  # read only with FP8_KV
        seqlens if v_descale is None else v_descale,
        seqlen_q,
        group,
        splits,
        k_cache.shape[1],
        softmax_scale / softcap if softcap > 0 else softmax_scale * LOG2E,
        softcap * LOG2E,
        window_left,
        window_right,
        *q.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        seqlens.stride(0),
        *block_table.stride(),
        0 if leftpad is None else leftpad.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_M=config["BLOCK_M"],
        BLOCK_N=config["BLOCK_N"],
        BLOCK_D=config["BLOCK_D"],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ALIGNED=config["ALIGNED"],
        HAS_LEFTPAD=leftpad is not None,
        SOFTCAP=softcap > 0,
        FP8_KV=k_descale is not None,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        maxnreg=config["maxnreg"],
    )
    if splits > 1:
        num_rows = batch * seqlen_q * num_heads_q
        _merge_kernel[(num_rows,)](
            part_out, part_lse, out, lse, num_rows, splits, seqlen_q, num_heads_q,
            HEAD_DIM=head_dim, BLOCK_D=config["BLOCK_D"], BLOCK_S=_merge_block(splits), num_warps=4,
        )  # fmt: skip
    return out, lse


def _example_launch(dtype: torch.dtype, head_dim: int, seqlen_q: int, aligned: bool, fp8: bool, splits: int) -> None:
    """paged_attention on meta tensors: a batch of 2, 32 query and 4 KV heads (Qwen3-MoE), 16-token pages, 64 pages
    per sequence; unaligned: the caches start one element into their buffer (rows not on 16 bytes)."""
    batch, heads_q, heads_kv, page, pages, meta = 2, 32, 4, 16, 64, {"device": META}
    q = torch.empty(batch, seqlen_q, heads_q, head_dim, dtype=dtype, **meta)
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    shape = torch.Size((batch * pages, page, heads_kv, head_dim))
    start = 0 if aligned else 1
    caches = [torch.empty(shape.numel() + 1, dtype=cache_dtype, **meta)[start : start + shape.numel()].view(shape)
              for _ in "kv"]  # fmt: skip
    seqlens = torch.empty(batch, dtype=torch.int32, **meta)
    block_table = torch.empty(batch, pages, dtype=torch.int32, **meta)
    descales = [torch.empty(batch, heads_kv, **meta) for _ in "kv"] if fp8 else [None, None]
    paged_attention(q, *caches, seqlens, block_table, None, head_dim**-0.5, -1, 0, 0.0, splits, *descales)


def compile_specs() -> list[CompileSpec]:
    """The launches for every dtype and head dim, decode (Sq * G = 8 rows) and a 4-token chunk (32 rows), aligned
    and unaligned caches, 16-bit and fp8 caches (aligned only: the launcher refuses the others), one split and
    2, 3, 5 and 16 (the split kernel with `num_splits` 1, plain and a multiple of 16; the merge at each BLOCK_S)."""
    specs = []
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for dtype, head_dim, seqlen_q, aligned, fp8, splits in itertools.product(
        dtypes, (64, 128, 256), (1, 4), (True, False), (False, True), (1, 2, 3, 5, 16)
    ):
        if fp8 and not aligned:
            continue
        label = f"D={head_dim} Sq={seqlen_q}" + ("" if aligned else " unaligned") + (" fp8 cache" if fp8 else "")
        launch = functools.partial(_example_launch, dtype, head_dim, seqlen_q, aligned, fp8, splits)
        specs += launches(launch, f"{label} splits={splits}")
    return specs
