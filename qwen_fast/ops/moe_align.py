"""moe_align_block_size: the (token, choice) pairs of a routing sorted by expert, padded to GEMM blocks."""

import torch

from qwen_fast.configs import moe_block_size
from qwen_fast.reference import moe_align as reference

from ._checks import INDEX_DTYPES, Require, check_int, check_tensor, raise_unless, traced
from ._dispatch import NATIVE_FIRST, Op
from ._library import define_triton_op, launcher, native_op


def choose_block_size(num_tokens: int, topk: int, num_experts: int) -> int:
    """BLOCK_M for the grouped GEMM: rows per block of moe_align_block_size, from the rows the busiest experts get
    (the rule: qwen_fast.configs.moe_block_size.choose_block_size, which the Triton launcher uses; this checks its
    arguments, ints >= 0, >= 1, >= 1; num_experts: the experts the ids route over).

    Example (Qwen3-30B-A3B, E = 128, k = 8):
        >>> [qwen_fast.ops.moe_align.choose_block_size(t, 8, 128) for t in (1, 64, 256, 512, 1024, 4096)]
        [16, 16, 32, 64, 128, 128]
    """
    check_int("num_tokens", num_tokens, low=0)
    check_int("topk", topk, low=1)
    check_int("num_experts", num_experts, low=1)
    return moe_block_size.choose_block_size(num_tokens, topk, num_experts)


def _align_sizes(topk_ids: torch.Tensor, block_size: int, num_experts: int) -> tuple:
    num_pairs = topk_ids.numel()
    max_padded = num_pairs + torch.sym_min(num_experts, num_pairs) * (block_size - 1)
    return max_padded, (max_padded + block_size - 1) // block_size


def _check_align_args(
    topk_ids: object, block_size: object, num_experts: object, require: Require = raise_unless
) -> None:
    """moe_align_block_size's contract (the eager check and the fake; `require`: see _checks.py)."""
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, require=require)
    check_int("block_size", block_size, low=1, require=require)
    check_int("num_experts", num_experts, low=1, require=require)


def _fake_moe_align_block_size(
    topk_ids: torch.Tensor, block_size: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_align_args(topk_ids, block_size, num_experts, traced)
    max_padded, max_blocks = _align_sizes(topk_ids, block_size, num_experts)
    new = topk_ids.new_empty
    return new(max_padded, dtype=torch.int32), new(max_blocks, dtype=torch.int32), new(1, dtype=torch.int32)


_moe_align_block_size_triton = define_triton_op(
    "moe_align_block_size(Tensor topk_ids, int block_size, int num_experts) -> (Tensor, Tensor, Tensor)",
    launcher("moe_align", "moe_align_block_size"),
    _fake_moe_align_block_size,
)
_moe_align_block_size_native = native_op("moe_align_block_size", _fake_moe_align_block_size)

MOE_ALIGN_BLOCK_SIZE = Op(
    "moe_align_block_size",
    {
        "cuda": _moe_align_block_size_native,
        "triton": _moe_align_block_size_triton,
        "cpu": _moe_align_block_size_native,
        "torch": reference.moe_align_block_size,
    },
    NATIVE_FIRST,
)


def check_expert_ids(name: str, topk_ids: torch.Tensor, num_experts: int) -> None:
    """Expert ids lie in [0, num_experts). Checked only where it costs no host sync (CPU, eager)."""
    if topk_ids.device.type != "cpu" or topk_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = int(topk_ids.min()), int(topk_ids.max())
    if low < 0 or high >= num_experts:
        raise ValueError(
            f"{name} must lie in [0, {num_experts}) (num_experts={num_experts}), got ids in [{low}, {high}]"
        )


def check_expert_map(expert_map: object, num_experts: int, device: torch.device, num_local: int | None = None) -> None:
    """expert_map [num_experts] int32 on `device`; its values (checked on CPU, eager, as check_expert_ids) lie in
    [-1, num_local) (num_local None: any local id >= -1)."""
    check_tensor("expert_map", expert_map, ndim=1, dtypes=(torch.int32,), device=device)
    if expert_map.shape[0] != num_experts:
        raise ValueError(
            f"expert_map must be [num_experts] = [{num_experts}] (global expert ids), got {tuple(expert_map.shape)}"
        )
    if expert_map.device.type != "cpu" or expert_map.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = int(expert_map.min()), int(expert_map.max())
    if low < -1 or (num_local is not None and high >= num_local):
        bound = ">= -1" if num_local is None else f"in [-1, {num_local}) (w1's E = {num_local})"
        raise ValueError(f"expert_map must hold local expert ids {bound} (-1: not on this rank), got [{low}, {high}]")


def moe_align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
    pad_sorted_ids: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flat (token, choice) indices t*k + j of `topk_ids` by expert, each expert's run padded to a multiple
    of `block_size`: vLLM's `moe_align_block_size` (v0.10.1.1 signature and fill values), with buffers sized
    T*k + min(E, T*k) * (block_size - 1) (vLLM allocates T*k + E * (block_size - 1): longer when T*k < E).

    Args:
        topk_ids: [T, k] int32/int64 expert ids in [0, num_experts). Checked on CPU tensors; on CUDA the check
            would need a host sync, and the kernels skip an id outside the range.
        block_size: rows per GEMM block, >= 1 (choose_block_size picks one for the grouped GEMM).
        num_experts: E, >= 1 (the cuda, cpu and triton kernels take E <= 4096); with expert_map, the global count.
        expert_map: [E] int32 or None (expert parallelism): global expert id -> this rank's local id, or -1 for an
            expert on another rank. expert_ids come out mapped (expert_map[expert_ids], vLLM's rule): a block of
            -1 belongs to another rank, and consumers skip it.
        pad_sorted_ids: lengthen sorted_token_ids with sentinels to a multiple of block_size.

    Returns:
        sorted_token_ids: int32 [T*k + min(E, T*k) * (block_size - 1)] (rounded up with pad_sorted_ids),
            padding = T*k.
        expert_ids: int32 [ceil(len(sorted_token_ids) / block_size)]; the blocks past num_tokens_post_padded hold 0
            (vLLM's fill, mapped to expert_map[0] with an expert_map): consumers stop at num_tokens_post_padded.
        num_tokens_post_padded: int32 [1].
        The exact layout is documented in qwen_fast.reference.moe_align.

    Example:
        >>> ids = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32)
        >>> sorted_ids, expert_ids, total = qwen_fast.moe_align_block_size(ids, block_size=2, num_experts=4)
        >>> sorted_ids.tolist(), expert_ids.tolist(), total.tolist()
        ([1, 4, 0, 2, 5, 6, 3, 6, 6, 6], [0, 2, 2, 3, 0], [8])
        >>> ep = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)  # this rank holds experts 2 and 3
        >>> qwen_fast.moe_align_block_size(ids, 2, 4, expert_map=ep)[1].tolist()
        [-1, 0, 0, 1, -1]
    """
    _check_align_args(topk_ids, block_size, num_experts)
    check_expert_ids("topk_ids", topk_ids, num_experts)
    if expert_map is not None:
        check_expert_map(expert_map, num_experts, topk_ids.device)
    if not isinstance(pad_sorted_ids, bool):
        raise TypeError(f"pad_sorted_ids must be a bool, got {type(pad_sorted_ids).__name__} {pad_sorted_ids!r}")
    layout = MOE_ALIGN_BLOCK_SIZE(topk_ids.device, topk_ids, block_size, num_experts)
    return reference.pad_and_map(layout, topk_ids.numel(), block_size, expert_map, pad_sorted_ids)
