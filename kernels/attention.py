"""Triton flash attention forward for GQA/MQA: dense [B, S, H, D] batches and packed varlen batches, one kernel.

Semantics: qwen_fast.reference.attention (bottom-right causal alignment, window_size, a row with no visible key
outputs 0). Algorithm: FlashAttention-2's forward (Dao 2023, arXiv:2307.08691) with online softmax in base 2.

Work split (grid (B * Hkv, cdiv(max_seqlen_q * G, BLOCK_M)), G = Hq // Hkv query heads per KV head): a program owns
one KV head of one sequence and BLOCK_M "rows", where the rows of a sequence are its (query position, query head of
the group) pairs flattened with the head fastest: row r is position r // G of query head kv_head * G + r % G. So all
G query heads of a KV group share each K/V tile a program loads: K/V are read once per group instead of once per
query head, and never repeated in memory (the packed-GQA layout of FlashAttention-3). For decode (Sq = 1) the G
heads fill the rows that a per-head split would leave empty. The m axis runs in reverse so that, causal, the
programs with the most key tiles start first.

Per program, in registers: the Q tile [BLOCK_M, HEAD_DIM] (loaded once), the fp32 accumulator [BLOCK_M, HEAD_DIM],
the running row max m_i and row sum l_i (fp32, base-2 units). Per key tile [BLOCK_N]: s = (q @ k^T) * scale * log2(e)
(the softmax scale folded into the exp2 argument; with a softcap, flash-attn's softcap * tanh(q.k * scale / softcap)
in the same base-2 units: s = tanh((q @ k^T) * scale / softcap) * softcap * log2(e)), m_new = max(m_i, rowmax(s)),
p = exp2(s - m_new), acc = acc * exp2(m_i - m_new) + p @ v (p cast to V's dtype for the tensor-core dot), l_i
likewise. A row whose visible keys so far are none has m = -inf; the exponent base is then taken as 0 so that p
and the rescale factor are exp2(-inf) = 0, never NaN, and the final acc / l_i writes 0 where l_i = 0. With EXTRAS
(a constexpr: the default kernel stays free of both) the softcap applies when cap_log2 > 0, and each row also writes
its natural-log log-sum-exp, (m_i + log2(l_i)) * ln(2), to softmax_lse (+inf where l_i = 0, as flash-attn).

Tile skipping: the program's rows span positions [p_first, p_last]; with d(i) = i + Sk - Sq, keys outside
[d(p_first) - left, d(p_last) + right] are invisible to every row, so the loop runs only over the tiles meeting that
range. Those are split into key tiles that every row sees in full (no mask computed) and the edge tiles before and
after them, which apply the per-element mask (key < Sk, causal/window bounds per row).

Layouts: batched q [B, Sq, Hq, D] at b * stride_b + i * stride_t; varlen q [Tq, Hq, D] at (cu_seqlens_q[b] + i) *
stride_t (stride_b = 0). Same for k/v. softmax_lse: flash-attn's [B, Hq, Sq] (batched) or [Hq, Tq] (varlen, batch
stride 0), contiguous along the queries. Token offsets are int64. Empty sequences (varlen) and rows past a
sequence's end are masked; programs whose rows all lie past it return at once.

Head dims: any multiple of 8 up to 256, padded to HEAD_DIM = the next power of 2 (>= 16) with masked loads and
stores (EVEN_D skips the masks when D is a power of 2). fp32 dots use input_precision "ieee" (no TF32), so the fp32
backend meets the fp32 tolerance.

Tiles (_config), chosen so that no config spills on sm_80 or sm_90 (Triton 3.8, checked statically). Given no
register budget, ptxas caps a thread at an occupancy step (64, 80, 96, 128 or 168 registers for 128 threads) and
spills a few bytes past it rather than take more; the tiles below are those that fit under its caps, and where none
did, `maxnreg` gives ptxas an explicit budget (.maxnreg: it then allocates what the kernel needs, up to the budget).
16-bit, D a power of 2: 128 x 64 tiles (rows x keys) with 8 warps up to HEAD_DIM 64 (4 at HEAD_DIM 32: 8 used stack on
sm_80; 4 spilled at 16 in the varlen layout, 168 registers), 64 x 64 at 128, 32 x 16 with 8 warps at 256 (128-row
tiles spilled at HEAD_DIM 128: the Q tile, the fp32 accumulator and the score tile need 255+ registers a thread;
32 x 32 spilled 16 B at 256 on sm_80, where 32 x 16 stays under the 128-register cap that fits two programs an SM).
fp32 (exact "ieee" dots on FMA units, operands in registers): 16 x 16 everywhere with 8 warps and maxnreg 128 (4 warps
spilled at HEAD_DIM 64 and 8 at 256 with EXTRAS under ptxas's own caps; with the budget they take 64-110 registers;
32-row tiles used local memory on sm_80 in the varlen layout). Short 16-bit queries (Sq * G <= 16 rows: decode) take
a 16 x 32 tile, so that no program is mostly empty rows, with 8 warps at HEAD_DIM 256 (4 spilled 12 B at 168
registers). Head dims that are not a power of 2 (D = 72, 200, ...) have strides the JIT cannot prove 16-aligned, so
the loads are scalar and every element needs its own pointer: 16-bit uses 32 x 32 tiles there, 8 warps except at
HEAD_DIM 64 (4 warps spilled at HEAD_DIM 32 on sm_90, 8 at 64); where even 16 x 16 spilled (masked HEAD_DIM 256, and
128 in fp32) the launcher runs the kernel on zero-padded copies of q/k/v instead (exact: zero dims add nothing to
q.k) and drops the padded output columns. compile_specs() lists every config, in the aligned specialization that
contiguous (or per-head sliced) tensors get from the JIT, and `python -m qwen_fast.gpu_check` compiles each for sm_80
and sm_90 and fails on spills.
"""

import functools
import itertools
import math

import torch
import triton
import triton.language as tl

from .compile_spec import META, CompileSpec, device_arch, launches
from .paged_attention import paged_attention

LOG2E = math.log2(math.e)
HEAD_DIMS = (16, 32, 64, 128, 256)  # HEAD_DIM, the padded head dim
DECODE_ROWS = 16  # Sq * G up to this: flash_attn_func runs the split-K decode kernel (one m16 row tile per group)


@triton.jit
def _tanh(x):
    """tanh(x) = 2 / (1 + exp(-2x)) - 1 through exp2 (Triton has no portable tanh); exp2 overflowing to inf for
    x << 0 gives -1, not NaN. This form keeps the 16-bit 128 x 64 tiles free of spills (a |x|-and-sign one spilled)."""
    return 2.0 / (1.0 + tl.math.exp2(-2.0 * 1.4426950408889634 * x)) - 1.0


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, k_base, v_base, cols, dims, diag, start, stop, seqlen_k, head_dim, left, right, qk_scale,
    cap_log2, stride_kt, stride_vt, MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EXTRAS: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key tiles [start, stop) (multiples of BLOCK_N = len(cols)). k_base/v_base: scalar
    pointers to key 0 of this sequence and KV head. MASKED tiles load keys < seqlen_k only and apply the
    causal/window mask; the others are fully visible. EXTRAS with cap_log2 > 0: qk_scale is scale / softcap and the
    scores are capped to tanh(.) * cap_log2."""
    block_n = cols.shape[0]
    k_tile = k_base + start.to(tl.int64) * stride_kt  # scalar pointers to the current tile, advanced per tile
    v_tile = v_base + start.to(tl.int64) * stride_vt
    for n0 in range(start, stop, block_n):
        keys = n0 + cols
        k_ptrs = k_tile + (dims[:, None] + cols[None, :] * stride_kt).to(tl.int32)  # in-tile offsets < 2^31
        v_ptrs = v_tile + (cols[:, None] * stride_vt + dims[None, :]).to(tl.int32)
        k_tile += block_n * stride_kt
        v_tile += block_n * stride_vt
        d_ok = dims < head_dim
        if MASKED:
            key_ok = keys < seqlen_k
            if EVEN_D:
                k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if EXTRAS:
            if cap_log2 > 0.0:
                s = _tanh(s) * cap_log2
        if MASKED:
            visible = (keys[None, :] < seqlen_k) & (keys[None, :] >= diag[:, None] - left)
            visible = visible & (keys[None, :] <= diag[:, None] + right)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: exp2(-inf - 0) = 0
        p = tl.math.exp2(s - base[:, None])
        alpha = tl.math.exp2(m_i - base)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _flash_attn_kernel(
    q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqlen_q_fixed, seqlen_k_fixed, num_kv_heads, group, head_dim, left,
    right, qk_scale, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
    stride_vh, stride_ob, stride_ot, stride_oh, lse, stride_lb, stride_lh, cap_log2, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EXTRAS: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(0) // num_kv_heads
    kv_head = tl.program_id(0) % num_kv_heads
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)  # causal: the longest programs first
    if IS_VARLEN:
        start_q = tl.load(cu_seqlens_q + batch)
        seqlen_q = tl.load(cu_seqlens_q + batch + 1) - start_q
        start_k = tl.load(cu_seqlens_k + batch)
        seqlen_k = tl.load(cu_seqlens_k + batch + 1) - start_k
    else:
        start_q = 0
        seqlen_q = seqlen_q_fixed
        start_k = 0
        seqlen_k = seqlen_k_fixed
    num_rows = seqlen_q * group
    row0 = m_block * BLOCK_M
    if row0 >= num_rows:
        return

    # Rows: (query position, query head of the group), head fastest.
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    pos = rows // group
    head = kv_head * group + rows % group
    diag = pos + seqlen_k - seqlen_q  # the key aligned with each row's query (bottom-right)
    dims = tl.arange(0, HEAD_DIM)
    d_ok = dims < head_dim
    batch64 = batch.to(tl.int64)
    q_rows = batch64 * stride_qb + (start_q + pos).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    o_rows = batch64 * stride_ob + (start_q + pos).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
    q_tile = tl.load(q + q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    kv_head64 = kv_head.to(tl.int64)
    k_base = k + batch64 * stride_kb + start_k.to(tl.int64) * stride_kt + kv_head64 * stride_kh
    v_base = v + batch64 * stride_vb + start_k.to(tl.int64) * stride_vt + kv_head64 * stride_vh
    cols = tl.arange(0, BLOCK_N)

    # Keys some row sees: [lo, hi); keys every row sees: [full_lo, full_hi] (see the module docstring).
    diag_first = row0 // group + seqlen_k - seqlen_q
    diag_last = (tl.minimum(row0 + BLOCK_M, num_rows) - 1) // group + seqlen_k - seqlen_q
    lo = tl.maximum(diag_first - left, 0)
    hi = tl.minimum(diag_last + right + 1, seqlen_k)
    full_lo = tl.maximum(diag_last - left, 0)
    full_hi = tl.maximum(tl.minimum(diag_first + right + 1, seqlen_k), 0)  # exclusive
    tile_lo = lo // BLOCK_N * BLOCK_N
    tile_hi = tl.maximum(hi, 0)
    tile_hi = (tile_hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    mid_lo = tl.maximum(tl.minimum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, tile_hi), tile_lo)
    mid_hi = tl.maximum(tl.minimum(full_hi // BLOCK_N * BLOCK_N, tile_hi), mid_lo)

    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q_tile, k_base, v_base, cols, dims, diag, tile_lo, mid_lo, seqlen_k, head_dim, left, right,
        qk_scale, cap_log2, stride_kt, stride_vt, True, EVEN_D, DOT_PRECISION, EXTRAS,
    )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q_tile, k_base, v_base, cols, dims, diag, mid_lo, mid_hi, seqlen_k, head_dim, left, right,
        qk_scale, cap_log2, stride_kt, stride_vt, False, EVEN_D, DOT_PRECISION, EXTRAS,
    )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q_tile, k_base, v_base, cols, dims, diag, mid_hi, tile_hi, seqlen_k, head_dim, left, right,
        qk_scale, cap_log2, stride_kt, stride_vt, True, EVEN_D, DOT_PRECISION, EXTRAS,
    )  # fmt: skip
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    result = tl.where((l_i > 0.0)[:, None], acc / l_safe[:, None], 0.0)  # no visible key: 0
    tl.store(
        out + o_rows[:, None] + dims[None, :], result.to(out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :]
    )
    if EXTRAS:
        row_lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("inf"))
        lse_rows = batch * stride_lb + head * stride_lh + start_q + pos  # int32: B * Hq * Sq < 2^31 (int64 spilled)
        tl.store(lse + lse_rows, row_lse, mask=row_ok)


def _head_dim_padded(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _copies_padded(dtype: torch.dtype, padded_head_dim: int, even_d: bool) -> bool:
    """Whether the launcher runs on zero-padded copies of q/k/v instead of masking the head dim: masked head dims
    of 256 (any dtype) and of 128 in fp32 spilled in every tile tried (scalar loads, see the module docstring)."""
    return not even_d and (padded_head_dim == 256 or (dtype == torch.float32 and padded_head_dim == 128))


def _config(dtype: torch.dtype, padded_head_dim: int, num_rows: int, even_d: bool, arch: int = 80) -> dict:
    """BLOCK_M, BLOCK_N, warps, stages (and for fp32 maxnreg) for one dtype, padded head dim, the rows of the longest
    sequence (Sq * G), whether D is a power of 2 and the GPU's compute capability major * 10 + minor (see the module
    docstring for why each tile is what it is)."""
    if dtype == torch.float32:  # exact fp32 dots on FMA units, operands in registers: 32-row tiles spilled
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1, "maxnreg": 128}
    if not even_d:  # scalar loads (strides not provably 16-aligned): 32 x 32; 8 warps spilled at 64, 4 at 32 (sm_90)
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4 if padded_head_dim == 64 else 8, "num_stages": 2}
    if num_rows <= 16:  # decode / tiny chunks: one m16 tile of rows
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8 if padded_head_dim == 256 else 4, "num_stages": 2}
    if padded_head_dim <= 64:  # 8 warps used stack at HEAD_DIM 32 on sm_80, 4 spilled at 16 (varlen)
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4 if padded_head_dim == 32 else 8, "num_stages": 2}
    if padded_head_dim <= 128:
        if arch >= 90:  # two warpgroups of 64 rows each (wgmma), where 64 rows made both compute the same rows
            return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}  # sm_80: warps split the columns
    return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2}  # 32 keys spilled (16 B) on sm_80


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, batch, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
            window_size, softcap, batch_strides) -> None:  # fmt: skip
    """Shared launcher. q/k/v/out are 3-D token views [T, H, D] (varlen) or 4-D [B, S, H, D] (batched); lse is None
    or fp32 [Hq, T] (varlen) / [B, Hq, S] (batched), filled with +inf by the caller (rows no program writes). With
    an lse or a softcap the EXTRAS kernel runs (it writes the lse, also when only the softcap asked for it)."""
    num_heads_q, head_dim = q.shape[-2], q.shape[-1]
    num_kv_heads = k.shape[-2]
    group = num_heads_q // num_kv_heads
    if out.numel() == 0 or batch == 0 or max_seqlen_q == 0:
        return
    padded = _head_dim_padded(head_dim)
    if _copies_padded(q.dtype, padded, padded == head_dim):  # exact: zero dims add nothing to q.k; outputs dropped
        q, k, v = (torch.nn.functional.pad(t, (0, padded - head_dim)) for t in (q, k, v))
        wide = out.new_zeros(*out.shape[:-1], padded)
        _launch(q, k, v, wide, lse, cu_seqlens_q, cu_seqlens_k, batch, max_seqlen_q, max_seqlen_k, softmax_scale,
                causal, window_size, softcap, batch_strides)  # fmt: skip
        out.copy_(wide[..., :head_dim])
        return
    extras = lse is not None or softcap > 0
    if extras and lse is None:  # a softcap alone: the EXTRAS kernel writes an lse nobody reads
        rows = (out.shape[0], out.shape[2], out.shape[1]) if batch_strides else (out.shape[1], out.shape[0])
        lse = torch.empty(rows, dtype=torch.float32, device=out.device)
    unbounded = max_seqlen_q + max_seqlen_k  # a window edge that no key can pass
    left = unbounded if window_size[0] < 0 else window_size[0]
    right = 0 if causal else (unbounded if window_size[1] < 0 else window_size[1])
    config = _config(q.dtype, padded, max_seqlen_q * group, padded == head_dim, device_arch(q.device))
    grid = (batch * num_kv_heads, triton.cdiv(max_seqlen_q * group, config["BLOCK_M"]))
    strides = [t.stride(0) if batch_strides else 0 for t in (q, k, v, out)]
    token_dim = 1 if batch_strides else 0
    qk_scale = softmax_scale / softcap if softcap > 0 else softmax_scale * LOG2E
    lse_strides = (lse.stride(0) if batch_strides else 0, lse.stride(-2)) if extras else (0, 0)
    _flash_attn_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_kv_heads, group, head_dim, left,
        right, qk_scale,
        strides[0], q.stride(token_dim), q.stride(-2), strides[1], k.stride(token_dim), k.stride(-2),
        strides[2], v.stride(token_dim), v.stride(-2), strides[3], out.stride(token_dim), out.stride(-2),
        lse if extras else out, *lse_strides, softcap * LOG2E,
        HEAD_DIM=padded, EVEN_D=padded == head_dim, IS_VARLEN=cu_seqlens_q is not None,
        DOT_PRECISION=_precision(q.dtype), EXTRAS=extras, **config,
    )  # fmt: skip


_INDEX: dict[torch.device, torch.Tensor] = {}  # per device, int32 [n] = 0, 1, ..: block tables and lengths as views


def _index(device: torch.device, size: int) -> torch.Tensor:
    """int32 [>= size] holding 0, 1, 2, ..., kept per device and grown by doubling (no allocation per call)."""
    index = _INDEX.get(device)
    if index is None or index.shape[0] < size:
        index = _INDEX[device] = torch.arange(triton.next_power_of_2(size), dtype=torch.int32, device=device)
    return index


def _decode(q, k, v, softmax_scale, causal, window_size, softcap) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode-shaped calls (Sq * G <= DECODE_ROWS) on the split-K kernel of paged_attention: k/v [B, Sk, Hkv, D] are
    B pages of Sk rows (block table [[0], [1], ..], every length Sk: views of one cached index tensor), so the
    context is cut into splits that fill the GPU instead of one program per (sequence, KV head)."""
    batch, seqlen_k = q.shape[0], k.shape[1]
    index = _index(q.device, max(batch, seqlen_k + 1))
    table, lengths = index[:batch, None], index[seqlen_k : seqlen_k + 1].expand(batch)
    right = 0 if causal else window_size[1]
    return paged_attention(
        q, k, v, lengths, table, None, softmax_scale, window_size[0], right, softcap, 0, max_seqlen_k=seqlen_k
    )


def paged_prefill(q, k_cache, v_cache, seqlens, block_table, softmax_scale, window_left, window_right, softcap,
                  max_seqlen_k) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Many queries over a paged cache (chunked prefill): q [B, Sq, Hq, D], caches [num_blocks, block_size, Hkv, D],
    seqlens int32 [B] (<= max_seqlen_k, a host bound), block_table int32 [B, W]. Sequence b's keys are gathered into
    packed rows (B * max_seqlen_k of them, the tail unused; index arithmetic on the device, no sync) and attended by
    the varlen prefill kernel, causal bottom-right per sequence. Returns (out [B, Sq, Hq, D], lse fp32 [B, Hq, Sq])."""
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    block_size, device = k_cache.shape[1], q.device
    lengths = seqlens.long()
    cu_k = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    rows = torch.arange(batch * max_seqlen_k, device=device)
    seq = torch.searchsorted(cu_k[1:], rows, right=True).clamp(max=batch - 1)
    pos = rows - cu_k[seq]
    used = pos < lengths[seq]  # rows past the last sequence's keys read page 0 row 0 (never attended)
    page = torch.where(used, block_table[seq, (pos // block_size).clamp(max=block_table.shape[1] - 1)].long(), 0)
    slot = torch.where(used, pos % block_size, 0)
    keys, values = k_cache[page, slot], v_cache[page, slot]  # [B * max_seqlen_k, Hkv, D]: the used keys only
    cu_q = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * seqlen_q
    out, lse = flash_attn_varlen_func(
        q.reshape(batch * seqlen_q, num_heads_q, head_dim), keys, values, cu_q, cu_k.to(torch.int32), seqlen_q,
        max_seqlen_k, softmax_scale, False, (window_left, window_right), softcap, True,
    )  # fmt: skip
    return out.view(q.shape), lse.view(num_heads_q, batch, seqlen_q).transpose(0, 1).contiguous()


def flash_attn_func(q, k, v, softmax_scale, causal, window_size, softcap, return_lse) -> tuple[torch.Tensor, ...]:
    """Launcher; arguments as qwen_fast.flash_attn_func (checked there): q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D].
    Returns (out [B, Sq, Hq, D] in q's dtype, softmax_lse fp32 [B, Hq, Sq] or, without return_lse, empty [0]);
    inputs are read through their strides (no copies). Decode shapes (Sq * G <= DECODE_ROWS) run split-K."""
    if q.shape[1] * (q.shape[2] // k.shape[2]) <= DECODE_ROWS and k.shape[1] > 0 and q.numel() > 0:
        out, lse = _decode(q, k, v, softmax_scale, causal, window_size, softcap)
        return out, lse if return_lse else q.new_empty(0, dtype=torch.float32)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("inf"), device=q.device) if return_lse else None
    _launch(q, k, v, out, lse, None, None, q.shape[0], q.shape[1], k.shape[1], softmax_scale, causal, window_size,
            softcap, batch_strides=True)  # fmt: skip
    return out, q.new_empty(0, dtype=torch.float32) if lse is None else lse


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                           window_size, softcap, return_lse) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Launcher; arguments as qwen_fast.flash_attn_varlen_func (checked there): q [Tq, Hq, D], k/v [Tk, Hkv, D],
    cu_seqlens int32 [B + 1], any strides (the kernel reads offset b at b: made contiguous, a copy of B + 1 ints only
    when strided). Returns (out [Tq, Hq, D], softmax_lse fp32 [Hq, Tq] or, without return_lse, empty [0]); query
    rows outside every sequence are 0, with lse +inf."""
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), device=q.device) if return_lse else None
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k,
            softmax_scale, causal, window_size, softcap, batch_strides=False)  # fmt: skip
    return out, q.new_empty(0, dtype=torch.float32) if lse is None else lse


def _example_launch(dtype: torch.dtype, head_dim: int, seqlen_q: int, varlen: bool, extras: bool) -> None:
    """flash_attn_func / flash_attn_varlen_func on meta tensors: 32 query and 4 KV heads (Qwen3-MoE), q/k/v sliced
    from one fused qkv projection as a model passes them, 64 keys; extras: with softmax_lse and a softcap."""
    heads_q, heads_kv, seqlen_k, meta = 32, 4, 64, {"device": META}
    rows = seqlen_q if varlen else 2 * seqlen_q
    qkv = torch.empty(rows, (heads_q + 2 * heads_kv) * head_dim, dtype=dtype, **meta)
    q = qkv[:, : heads_q * head_dim].view(rows, heads_q, head_dim)
    k, v = (torch.empty(seqlen_k if varlen else 2 * seqlen_k, heads_kv, head_dim, dtype=dtype, **meta) for _ in "kv")
    options = (head_dim**-0.5, True, (-1, -1), 30.0 if extras else 0.0, extras)
    if varlen:
        cu_q, cu_k = (torch.empty(3, dtype=torch.int32, **meta) for _ in "qk")
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, seqlen_q, seqlen_k, *options)
    else:
        batched = (t.view(2, t.shape[0] // 2, *t.shape[1:]) for t in (q, k, v))
        flash_attn_func(*batched, *options)


def compile_specs() -> list[CompileSpec]:
    """The launches for every dtype and head dim (powers of 2 and, padded, multiples of 8 that are not), short
    queries (decode: Sq * G <= 16 rows) and long ones, dense and varlen batches, with and without EXTRAS."""
    specs = []
    for dtype, head_dim, seqlen_q, varlen, extras in itertools.product(
        (torch.float32, torch.float16, torch.bfloat16), HEAD_DIMS + (24, 40, 72, 136), (1, 256), (False, True),
        (False, True),
    ):  # fmt: skip
        label = f"D={head_dim} Sq={seqlen_q} {'varlen' if varlen else 'batched'}" + (" extras" if extras else "")
        specs += launches(functools.partial(_example_launch, dtype, head_dim, seqlen_q, varlen, extras), label)
    return specs
