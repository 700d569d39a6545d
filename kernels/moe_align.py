"""Triton moe_align_block_size: a deterministic counting sort of the flat expert ids (layout and sizes:
qwen_fast/reference/moe_align.py; the same algorithm as csrc/moe_align.h).

The N = T*k flat ids are cut into `rows` tiles of `tile` ids (tile = max(1024, ceil(N / 256)) rounded up to SUB, so
rows <= 256 and the single-program prefix below loops over at most 256 rows). Four launches:

1. _count_kernel, program r owns tile r: walks it in chunks of SUB ids, one id per thread (COUNT_WARPS = 2), and
   adds each valid id to counts[r, e] with an integer atomic (order-independent, so deterministic). counts
   [rows, E] int32 starts zeroed.
2. _prefix_kernel, one program: holds a vector of E_PAD = next_power_of_2(E) int32 in registers. totals = column
   sums of counts; padded = ceil(total / block_size) * block_size; offsets = exclusive cumsum (stored [E + 1],
   offsets[E] = num_tokens_post_padded); then writes the tiles' write bases base[r, e] = offsets[e] +
   sum_{r' < r} counts[r', e] to a separate [rows, E] buffer (not in place: when E_PAD is smaller than the
   program's threads, an element is held by several threads, and an in-place rewrite would race their loads).
3. _expert_ids_kernel, program b owns BLOCK_B entries of expert_ids: binary search of offsets (STEPS =
   bit_length(E - 1) halvings) for the largest e with offsets[e] <= b * block_size; 0 past the used entries
   (vLLM's fill).
4. _scatter_kernel, program r owns tile r: per chunk of SUB ids, rank[i] = #{j < i in the chunk with the same
   expert} from a [SUB, SUB] comparison (SUB = 64: 4096 booleans, 32 per thread at 4 warps), position =
   base[r, e] + rank; the last id of each expert in the chunk stores base[r, e] = position + 1 for the next chunk.
   Barriers order the loads of base before the stores and the stores before the next chunk's loads. Chunks run in
   ascending order, so each expert's run holds ascending flat indices: the same bits as the CPU and CUDA kernels.

Ids outside [0, E) are skipped (the Python API rejects them on CPU tensors; on CUDA that check would need a sync).
sorted_token_ids is prefilled with the sentinel N by torch.full. Offsets fit int32: N + min(E, N) * (block_size - 1)
< 2^31 is checked by the launcher.
"""

import functools
import itertools

import torch
import triton
import triton.language as tl

from .compile_spec import META, CompileSpec, launches

SUB = 64  # ids per chunk: the [SUB, SUB] rank comparison stays at 32 booleans per thread with 4 warps
MIN_TILE = 1024  # ids per tile at least, so small batches are one tile (one program per kernel)
MAX_ROWS = 256  # tiles at most: the prefix program's loop over rows stays short
BLOCK_B = 1024  # expert_ids entries per program of the binary search (8 per thread at 4 warps)
MAX_EXPERTS = 4096  # the prefix program holds E_PAD int32 vectors in registers
COUNT_WARPS = 2  # 64 threads for the SUB = 64 ids of a chunk: one id per thread, no replicated atomics


@triton.jit(do_not_specialize=["num_pairs"])  # T-dependent ints: one binary for every batch size
def _count_kernel(ids, counts, num_pairs, num_experts, tile, SUB: tl.constexpr):
    row = tl.program_id(0)
    begin = row * tile
    end = tl.minimum(begin + tile, num_pairs)
    ones = tl.full([SUB], 1, tl.int32)
    for start in range(begin, end, SUB):
        offs = start + tl.arange(0, SUB)
        mask = offs < end
        expert = tl.load(ids + offs, mask=mask, other=-1).to(tl.int32)
        valid = mask & (expert >= 0) & (expert < num_experts)
        tl.atomic_add(counts + row * num_experts + expert, ones, mask=valid)


@triton.jit(do_not_specialize=["rows"])
def _prefix_kernel(counts, bases, offsets, post_padded, rows, num_experts, block_size, E_PAD: tl.constexpr):
    experts = tl.arange(0, E_PAD)
    emask = experts < num_experts
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for r in range(rows):
        total += tl.load(counts + r * num_experts + experts, mask=emask, other=0)
    padded = (total + block_size - 1) // block_size * block_size
    start = tl.cumsum(padded, 0) - padded
    used = tl.sum(padded, 0)
    tl.store(offsets + experts, start, mask=emask)
    tl.store(offsets + num_experts, used)
    tl.store(post_padded, used)
    running = start
    for r in range(rows):
        count = tl.load(counts + r * num_experts + experts, mask=emask, other=0)
        tl.store(bases + r * num_experts + experts, running, mask=emask)
        running += count


@triton.jit(do_not_specialize=["max_blocks"])
def _expert_ids_kernel(
    offsets, expert_ids, max_blocks, num_experts, block_size, BLOCK_B: tl.constexpr, STEPS: tl.constexpr
):
    blocks = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = blocks < max_blocks
    start = blocks * block_size
    low = tl.zeros([BLOCK_B], dtype=tl.int32)
    high = tl.zeros([BLOCK_B], dtype=tl.int32) + (num_experts - 1)
    for _ in tl.static_range(STEPS):  # invariant: offsets[low] <= start < offsets[high + 1]
        mid = (low + high + 1) // 2
        go = tl.load(offsets + mid) <= start
        low = tl.where(go, mid, low)
        high = tl.where(go, high, mid - 1)
    used = tl.load(offsets + num_experts)
    tl.store(expert_ids + blocks, tl.where(start < used, low, 0), mask=bmask)


@triton.jit(do_not_specialize=["num_pairs"])
def _scatter_kernel(ids, bases, sorted_ids, num_pairs, num_experts, tile, SUB: tl.constexpr):
    row = tl.program_id(0)
    begin = row * tile
    end = tl.minimum(begin + tile, num_pairs)
    lanes = tl.arange(0, SUB)
    earlier = lanes[None, :] < lanes[:, None]
    later = lanes[None, :] > lanes[:, None]
    base_row = bases + row * num_experts
    for start in range(begin, end, SUB):
        offs = start + lanes
        mask = offs < end
        expert = tl.load(ids + offs, mask=mask, other=-1).to(tl.int32)
        valid = mask & (expert >= 0) & (expert < num_experts)
        expert = tl.where(valid, expert, -1)
        same = expert[:, None] == expert[None, :]
        rank = tl.sum((same & earlier).to(tl.int32), axis=1)
        is_last = tl.sum((same & later).to(tl.int32), axis=1) == 0
        position = tl.load(base_row + expert, mask=valid, other=0) + rank
        tl.store(sorted_ids + position, offs.to(tl.int32), mask=valid)
        tl.debug_barrier()  # every base of this chunk is read before one is advanced
        tl.store(base_row + expert, position + 1, mask=valid & is_last)
        tl.debug_barrier()  # advanced bases are visible to the next chunk


def _config(num_experts: int) -> dict:
    e_pad = triton.next_power_of_2(num_experts)
    return {
        "E_PAD": e_pad,
        "prefix_warps": max(4, min(16, e_pad // 256)),
        "STEPS": max(1, (num_experts - 1).bit_length()),
    }


def tiling(num_pairs: int) -> tuple[int, int]:
    """(ids per tile, tiles) for N = num_pairs flat ids."""
    tile = max(MIN_TILE, triton.cdiv(num_pairs, MAX_ROWS))
    tile = triton.cdiv(tile, SUB) * SUB
    return tile, max(1, triton.cdiv(num_pairs, tile))


def moe_align_block_size(
    topk_ids: torch.Tensor, block_size: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher; arguments and outputs as qwen_fast.moe_align_block_size (checked there)."""
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}] for the Triton kernels, got {num_experts}")
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    max_padded = num_pairs + min(num_experts, num_pairs) * (block_size - 1)
    if max_padded >= 2**31:
        raise ValueError(f"T*k + min(E, T*k) * (block_size - 1) = {max_padded} does not fit int32 sorted_token_ids")
    max_blocks = triton.cdiv(max_padded, block_size)
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    expert_ids = torch.empty((max_blocks,), dtype=torch.int32, device=device)
    post_padded = torch.zeros((1,), dtype=torch.int32, device=device)
    if num_pairs == 0:
        return sorted_ids, expert_ids, post_padded
    ids = topk_ids.contiguous()
    config = _config(num_experts)
    tile, rows = tiling(num_pairs)
    counts = torch.zeros((rows, num_experts), dtype=torch.int32, device=device)
    bases = torch.empty((rows, num_experts), dtype=torch.int32, device=device)
    offsets = torch.empty((num_experts + 1,), dtype=torch.int32, device=device)
    _count_kernel[(rows,)](ids, counts, num_pairs, num_experts, tile, SUB=SUB, num_warps=COUNT_WARPS)
    _prefix_kernel[(1,)](
        counts, bases, offsets, post_padded, rows, num_experts, block_size, E_PAD=config["E_PAD"],
        num_warps=config["prefix_warps"],
    )  # fmt: skip
    _expert_ids_kernel[(triton.cdiv(max_blocks, BLOCK_B),)](
        offsets, expert_ids, max_blocks, num_experts, block_size, BLOCK_B=BLOCK_B, STEPS=config["STEPS"],
        num_warps=4,
    )  # fmt: skip
    _scatter_kernel[(rows,)](ids, bases, sorted_ids, num_pairs, num_experts, tile, SUB=SUB, num_warps=4)
    return sorted_ids, expert_ids, post_padded


def compile_specs() -> list[CompileSpec]:
    """The launches at every expert count a family uses and the limits (E, k: Mixtral 8, 2; Qwen2-MoE 60, 4; OLMoE
    64, 8; Qwen3-MoE 128, 8; DeepSeek-V3 256, 8; 1024; MAX_EXPERTS), for decode and prefill (T = 1, 4096), at the
    smallest and largest block size, with int32 and int64 ids."""
    specs = []
    for (num_experts, topk), num_tokens, block_size, dtype in itertools.product(
        ((8, 2), (60, 4), (64, 8), (128, 8), (256, 8), (1024, 8), (MAX_EXPERTS, 8)),
        (1, 4096),
        (16, 128),
        (torch.int32, torch.int64),
    ):
        ids = torch.empty(num_tokens, topk, dtype=dtype, device=META)
        label = f"E={num_experts} T={num_tokens} k={topk} block_size={block_size}"
        specs += launches(functools.partial(moe_align_block_size, ids, block_size, num_experts), label)
    return specs
