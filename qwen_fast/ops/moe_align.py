"""moe_align_block_size: the (token, choice) pairs of a routing sorted by expert, padded to GEMM blocks."""

import torch

from qwen_fast.reference import moe_align as reference

from ._checks import INDEX_DTYPES, check_int, check_tensor
from ._dispatch import NATIVE_FIRST, Op

MOE_ALIGN_BLOCK_SIZE = Op("moe_align_block_size", {"torch": reference.moe_align_block_size}, NATIVE_FIRST)


def check_expert_ids(name: str, topk_ids: torch.Tensor, num_experts: int) -> None:
    """Expert ids lie in [0, num_experts). Checked only where it costs no host sync (CPU, eager)."""
    if topk_ids.device.type != "cpu" or topk_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = int(topk_ids.min()), int(topk_ids.max())
    if low < 0 or high >= num_experts:
        raise ValueError(
            f"{name} must lie in [0, {num_experts}) (num_experts={num_experts}), got ids in [{low}, {high}]"
        )


def moe_align_block_size(
    topk_ids: torch.Tensor, block_size: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flat (token, choice) indices t*k + j of `topk_ids` by expert, each expert's run padded to a multiple
    of `block_size` (vLLM's `moe_align_block_size`, with buffers sized T*k + min(E, T*k) * (block_size - 1)).

    Args:
        topk_ids: [T, k] int32/int64 expert ids in [0, num_experts).
        block_size: rows per GEMM block, >= 1.
        num_experts: E, >= 1.

    Returns:
        sorted_token_ids: int32 [T*k + min(E, T*k) * (block_size - 1)], padding = T*k.
        expert_ids: int32 [ceil(len(sorted_token_ids) / block_size)], -1 for unused blocks.
        num_tokens_post_padded: int32 [1].
        The exact layout is documented in qwen_fast.reference.moe_align.

    Example:
        >>> ids = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32)
        >>> sorted_ids, expert_ids, total = qwen_fast.moe_align_block_size(ids, block_size=2, num_experts=4)
        >>> sorted_ids.tolist(), expert_ids.tolist(), total.tolist()
        ([1, 4, 0, 2, 5, 6, 3, 6, 6, 6], [0, 2, 2, 3, -1], [8])
    """
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_int("block_size", block_size, low=1)
    check_int("num_experts", num_experts, low=1)
    check_expert_ids("topk_ids", topk_ids, num_experts)
    return MOE_ALIGN_BLOCK_SIZE(topk_ids.device, topk_ids, block_size, num_experts)
