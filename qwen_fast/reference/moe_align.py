"""Reference `moe_align_block_size`: group the (token, choice) pairs of a routing by expert, in blocks of one expert.

A grouped-GEMM MoE kernel gives each program instance one block of `block_size` rows that all belong to one expert.
This function lays out those rows (vLLM semantics, with a tighter buffer bound). Let

    flat = topk_ids.flatten()          N = flat.numel() = T * k; the pair (t, j) has flat index i = t * k + j
    c[e] = #{i : flat[i] == e}         the number of pairs routed to expert e, for e in [0, num_experts)
    p[e] = ceil(c[e] / block_size) * block_size          expert e's run, padded (0 for an expert with no pairs)

Contract (kernels reproduce it bit for bit):

    sizes (from the shapes alone, so a kernel can allocate them without a host sync):
        max_num_tokens_padded = N + min(num_experts, N) * (block_size - 1)
        max_num_blocks        = ceil(max_num_tokens_padded / block_size)
        These bound the real size: at most min(E, N) experts have pairs, each pads by at most block_size - 1.
        (vLLM allocates N + E * (block_size - 1), looser when N < E, as in decode.)

    sorted_token_ids: int32 [max_num_tokens_padded]. For e = 0, 1, ..., num_experts - 1 in ascending order, every
        expert with c[e] > 0 contributes one run of p[e] entries: the c[e] flat indices i with flat[i] == e in
        ascending order, then p[e] - c[e] copies of the sentinel N. Runs are concatenated with no gaps, so each run
        starts at a multiple of block_size. Every entry after the last run is also N. Each flat index in [0, N)
        appears exactly once.

    expert_ids: int32 [max_num_blocks]. expert_ids[b] is the expert of block b, i.e. of the entries
        sorted_token_ids[b * block_size : (b + 1) * block_size]; it is 0 (vLLM's fill: a valid expert id) for every
        block at or past num_tokens_post_padded / block_size, which consumers never read. Nondecreasing over the used
        blocks; experts with no pairs get no block.

    num_tokens_post_padded: int32 [1], = sum_e p[e], a multiple of block_size and <= max_num_tokens_padded.

Example (T = 3, k = 2, block_size = 2, num_experts = 4):

    topk_ids = [[2, 0], [2, 3], [0, 2]]   flat = [2, 0, 2, 3, 0, 2]   N = 6   c = [2, 0, 3, 1]
    max_num_tokens_padded = 6 + min(4, 6) * 1 = 10,   max_num_blocks = 5
    sorted_token_ids       = [1, 4,  0, 2, 5, 6,  3, 6,  6, 6]
    expert_ids             = [0,     2,     2,     3,     0]
    num_tokens_post_padded = [8]

vLLM's two options (v0.10.1.1):
    pad_sorted_ids: sorted_token_ids is lengthened with sentinels to a multiple of block_size (expert_ids keeps its
        length, which is already ceil(len / block_size)).
    expert_map: [num_experts] int32, global expert id -> local id or -1 (expert parallelism): the layout is computed
        on the global ids as above, then expert_ids = expert_map[expert_ids] (every block, the trailing ones included,
        so those read expert_map[0]). A block of -1 belongs to an expert of another rank: consumers skip it.
"""

import torch


def pad_and_map(
    layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_pairs: int,
    block_size: int,
    expert_map: torch.Tensor | None,
    pad_sorted_ids: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's pad_sorted_ids and expert_map applied to a layout of `num_pairs` = T*k pairs (the sentinel)."""
    sorted_token_ids, expert_ids, num_tokens_post_padded = layout
    if pad_sorted_ids and sorted_token_ids.shape[0] % block_size != 0:
        extra = block_size - sorted_token_ids.shape[0] % block_size
        sorted_token_ids = torch.cat([sorted_token_ids, sorted_token_ids.new_full((extra,), num_pairs)])
    if expert_map is not None:
        expert_ids = expert_map[expert_ids.long()].to(torch.int32)
    return sorted_token_ids, expert_ids, num_tokens_post_padded


def moe_align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
    pad_sorted_ids: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flat (token, choice) indices of `topk_ids` by expert and pad each expert's run to `block_size`.

    See the module docstring for the exact layout, sizes and fill values.

    Args:
        topk_ids: [T, k] int32 or int64, expert ids in [0, num_experts).
        block_size: rows per block, >= 1.
        num_experts: E, the number of experts.
        expert_map: [E] int32 global -> local expert id or -1, or None.
        pad_sorted_ids: lengthen sorted_token_ids to a multiple of block_size.

    Returns:
        sorted_token_ids: [T*k + min(E, T*k) * (block_size - 1)] int32 (rounded up to a multiple of block_size with
            pad_sorted_ids), flat indices t*k + j, sentinel T*k.
        expert_ids: [ceil(len(sorted_token_ids) / block_size)] int32, one expert per block, 0 when unused (both
            mapped through expert_map when given).
        num_tokens_post_padded: [1] int32, the number of used entries of sorted_token_ids.

    Example:
        >>> ids = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32)
        >>> sorted_ids, expert_ids, n = moe_align_block_size(ids, 2, 4)
        >>> sorted_ids.tolist(), expert_ids.tolist(), n.tolist()
        ([1, 4, 0, 2, 5, 6, 3, 6, 6, 6], [0, 2, 2, 3, 0], [8])
    """
    device = topk_ids.device
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    max_num_tokens_padded = num_pairs + min(num_experts, num_pairs) * (block_size - 1)
    max_num_blocks = (max_num_tokens_padded + block_size - 1) // block_size

    sorted_token_ids = torch.full((max_num_tokens_padded,), num_pairs, dtype=torch.int32, device=device)
    expert_ids = torch.zeros((max_num_blocks,), dtype=torch.int32, device=device)

    # A stable sort by expert keeps the flat indices of each expert in ascending order.
    order = torch.sort(flat, stable=True).indices.to(torch.int32)
    counts = torch.bincount(flat, minlength=num_experts).tolist()

    src = 0  # start of the current expert's pairs in `order`
    dst = 0  # start of the current expert's run in `sorted_token_ids`, a multiple of block_size
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        num_blocks = (count + block_size - 1) // block_size
        sorted_token_ids[dst : dst + count] = order[src : src + count]
        expert_ids[dst // block_size : dst // block_size + num_blocks] = expert
        src += count
        dst += num_blocks * block_size

    num_tokens_post_padded = torch.tensor([dst], dtype=torch.int32, device=device)
    layout = (sorted_token_ids, expert_ids, num_tokens_post_padded)
    return pad_and_map(layout, num_pairs, block_size, expert_map, pad_sorted_ids)
