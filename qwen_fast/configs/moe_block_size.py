"""The grouped GEMM's default BLOCK_M (kernels/moe_gemm.py): the block size of moe_align_block_size's layout.

A shape heuristic, not a kernel: kernels/ read it here (kernels never import qwen_fast.ops), and
qwen_fast.ops.moe_align.choose_block_size is its checked public face.
"""

import math

# The GEMM block sizes choose_block_size picks from: BLOCK_M of the grouped GEMM's tiles.
BLOCK_SIZES = (16, 32, 64, 128)


def busy_expert_rows(num_tokens: int, topk: int, num_experts: int) -> int:
    """The rows the busiest experts get, from what the host knows without a sync: an expert gets each token at most
    once (at most T rows, exactly T when k = E), and under uniform routing its count is Binomial(T, k / E), whose
    mean plus two standard deviations (about the 98th percentile) bounds all but the odd expert."""
    share = min(1.0, topk / num_experts)
    mean = num_tokens * share
    return min(num_tokens, math.ceil(mean + 2.0 * math.sqrt(mean * (1.0 - share))))


def choose_block_size(num_tokens: int, topk: int, num_experts: int) -> int:
    """BLOCK_M for the grouped GEMM: rows per block of moe_align_block_size, from the rows of the busiest experts.
    Arguments unchecked (ints >= 0, >= 1, >= 1); num_experts is the count the ids route over (the global one under
    an expert map).

    Rule: BLOCK_M is the smallest of 16, 32, 64, 128 that holds busy_expert_rows (128 past 64). Each block re-reads
    its expert's weights, so a BLOCK_M below the busy experts' counts multiplies the weight traffic that bounds the
    GEMMs up to T of several hundred; the mean (T * k / E) is below what half the experts get (T = 256, k = 8,
    E = 128: mean 16, busy 24: BLOCK_M 32, one block for nearly every expert instead of two for half of them).
    Decode and small batches (T <= 16: at most T rows an expert) get 16, which pads each active expert by at most 15
    rows (vLLM's fixed 64 pads the 8 rows of one decode token to 512).
    """
    rows = busy_expert_rows(num_tokens, topk, num_experts)
    return next((b for b in BLOCK_SIZES if b >= rows), BLOCK_SIZES[-1])
