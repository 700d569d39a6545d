"""GQAAttention inside transformers' continuous batching (`generate_batch`): its paged cache read and written in place.

Continuous batching packs every scheduled sequence into one row of Tq tokens and passes, per forward, `cu_seq_lens_q`
(int32 [N + 1]), per layer group `cu_seq_lens_k` and host ints `max_length_q/k`, and per cache group the int64 slots
to write (`write_index` [Tq]) and to read (`read_index`: every key of every sequence, in order). Its cache keeps each
layer's keys and values as pages, `get_cache_for_block_table(layer) -> ([num_pages, page_size, Hkv, D],) * 2`, and a
slot s is token s % page_size of page s // page_size of those views (transformers 5.24,
generation/continuous_batching/cache_allocators/full_attention.py).

Per layer (qwen_fast.nn.GQAAttention calls `batched_attention`):
    q, k     = q/k RMSNorm + RoPE, k and v written at write_index    (qk_norm_rope_and_cache: one pass)
    decode   (max_length_q == 1): each sequence's pages, read off read_index (the slot of its j-th page's first
               token), form a block table; flash_attn_with_kvcache attends over the pages in place
    otherwise (prefill, chunked prefill, mixed): keys gathered by read_index (none to gather when nothing was cached)
               and flash_attn_varlen_func, causal bottom-right per sequence
A layer group without page views (transformers' sliding-window allocator) goes through the cache's own `update`
(write, then gather) and the varlen kernel.
"""

import torch

from qwen_fast.ops import FLASH_ATTN_VARLEN, FLASH_ATTN_WITH_KVCACHE, QK_NORM_ROPE_AND_CACHE, RESHAPE_AND_CACHE


def is_continuous_batching(cache: object, kwargs: dict) -> bool:
    """Whether a forward comes from transformers' continuous batching (its cache and its packed-row arguments)."""
    return cache is not None and hasattr(cache, "layer_to_allocator") and "cu_seq_lens_q" in kwargs


def batched_attention(module, cache, q_rows, k_rows, v_rows, rope, kwargs: dict, window) -> torch.Tensor:
    """[Tq, Hq, D] attention output of `module` (a GQAAttention) for continuous batching's packed rows q/k/v
    [Tq, heads, D] (before norm and RoPE); rope = (table, positions) as GQAAttention's rope_rows."""
    allocator = cache.layer_to_allocator[module.layer_idx]
    cu_q, max_q = kwargs["cu_seq_lens_q"].to(torch.int32), kwargs["max_length_q"]
    cu_k = kwargs["cu_seq_lens_k"][allocator.layer_type].to(torch.int32)
    max_k = kwargs["max_length_k"][allocator.layer_type]
    device, (table, positions) = q_rows.device, rope
    if not allocator.supports_block_table:  # no page views (sliding window): the cache writes and gathers
        q_rows, k_rows = module.norm_and_rope(q_rows, k_rows, positions, table)
        new_k, new_v = (t.transpose(0, 1)[None] for t in (k_rows, v_rows))
        keys, values = cache.update(new_k, new_v, module.layer_idx, dict(kwargs))
        keys, values = keys[0].transpose(0, 1), values[0].transpose(0, 1)
        return _varlen(module, q_rows, keys, values, cu_q, cu_k, max_q, max_k, window)

    key_pages, value_pages = allocator.get_cache_for_block_table(module.layer_idx)
    write, read = kwargs["write_index"][allocator.index], kwargs["read_index"][allocator.index]
    if module.q_norm is not None:
        q_rows, k_rows = QK_NORM_ROPE_AND_CACHE(
            device, q_rows, k_rows, v_rows, module.q_norm.weight, module.k_norm.weight,
            float(module.q_norm.variance_epsilon), positions, table, key_pages, value_pages, write, True,
        )  # fmt: skip
    else:
        q_rows, k_rows = module.norm_and_rope(q_rows, k_rows, positions, table)
        RESHAPE_AND_CACHE(device, k_rows.contiguous(), v_rows.contiguous(), key_pages, value_pages, write)
    if read.numel() == 0:  # nothing cached before this forward: the keys are the new rows
        return _varlen(module, q_rows, k_rows, v_rows, cu_q, cu_k, max_q, max_k, window)
    page_size = key_pages.shape[1]
    if max_q == 1:  # decode: one query per sequence, over its pages in place
        lengths = cu_k.diff()
        block_table = _block_table(read, cu_k, lengths, page_size, -(-max_k // page_size))
        num = lengths.shape[0]
        out = FLASH_ATTN_WITH_KVCACHE(
            device, q_rows[:num, None], key_pages, value_pages, None, None, lengths, block_table, module.scaling,
            True, window, max_seqlen_k=max_k,
        )[:, 0]  # fmt: skip
        return out if num == q_rows.shape[0] else torch.cat((out, out.new_zeros(q_rows.shape[0] - num, *out.shape[1:])))
    keys = key_pages.view(-1, *key_pages.shape[2:]).index_select(0, read)
    values = value_pages.view(-1, *value_pages.shape[2:]).index_select(0, read)
    return _varlen(module, q_rows, keys, values, cu_q, cu_k, max_q, max_k, window)


def _varlen(module, q_rows, keys, values, cu_q, cu_k, max_q: int, max_k: int, window) -> torch.Tensor:
    out, _ = FLASH_ATTN_VARLEN(  # no softcap, no lse
        q_rows.device, q_rows, keys, values, cu_q, cu_k, max_q, max_k, module.scaling, True, *window, 0.0, False
    )
    return out


def _block_table(read, cu_k, lengths, page_size: int, width: int) -> torch.Tensor:
    """int32 [N, width]: entry [b, j] = the page holding sequence b's keys j * page_size ..., read off the slot of
    that page's first key in `read`; -1 past the sequence."""
    starts = torch.arange(width, device=read.device) * page_size
    used = starts[None, :] < lengths[:, None]
    where = (cu_k[:-1, None] + starts[None, :]).clamp(max=read.numel() - 1)
    return torch.where(used, read[where] // page_size, -1).to(torch.int32)
