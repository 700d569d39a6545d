"""The grouped GEMM's default BLOCK_M (kernels/moe_gemm.py): the block size of moe_align_block_size's layout.

A shape heuristic, not a kernel: kernels/ read it here (kernels never import qwen_fast.ops), and
qwen_fast.ops.moe_align.choose_block_size is its checked public face.
"""

# The GEMM block sizes choose_block_size picks from: BLOCK_M of the grouped GEMM's tiles.
BLOCK_SIZES = (16, 32, 64, 128)


def choose_block_size(num_tokens: int, topk: int, num_experts: int) -> int:
    """BLOCK_M for the grouped GEMM: rows per block of moe_align_block_size, from the expected rows per expert.
    Arguments unchecked (ints >= 0, >= 1, >= 1).

    Rule: the N = num_tokens * topk routed rows fall on at most A = min(num_experts, N) experts, so an active expert
    gets about R = ceil(N / A) rows; BLOCK_M is the smallest of 16, 32, 64, 128 that holds R (128 when R > 64).
    Each active expert pads its run by at most BLOCK_M - 1 rows, so with R <= 16 (decode, small batches) the padding
    is at most A * 15 rows (vLLM's fixed 64 pads the 8 rows of one decode token to 512); and BLOCK_M stays no larger
    than the rows an expert has, while large batches get the 128-row tiles the GEMM runs fastest with.
    """
    num_pairs = num_tokens * topk
    active = max(1, min(num_experts, num_pairs))
    rows = -(-num_pairs // active)
    return next((b for b in BLOCK_SIZES if b >= rows), BLOCK_SIZES[-1])
