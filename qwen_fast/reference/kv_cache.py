"""Reference paged KV cache: writing tokens into pages, and attention that reads the keys from the cache.

A paged cache is a pool of `num_blocks` pages of `block_size` token slots each, [num_blocks, block_size, Hkv, D].
Slot s is page s // block_size, row s % block_size. Sequence b's block table row lists its pages in order, so its
position p lives in page block_table[b, p // block_size] at row p % block_size, i.e. in slot

    slot(b, p) = block_table[b, p // block_size] * block_size + p % block_size.

A contiguous cache [B, S_max, Hkv, D] is the special case of one page of S_max slots per sequence, with block
table [[0], [1], ..., [B - 1]]; `flash_attn_with_kvcache` treats it exactly so.

`flash_attn_with_kvcache` follows flash-attn: the new keys/values (if given) are written into the cache at positions
cache_seqlens[b] .. cache_seqlens[b] + Sq_new - 1, then the queries attend, causally aligned bottom-right, over the
first cache_seqlens[b] + Sq_new cache entries, with the attention math of qwen_fast.reference.attention.

Both functions MUTATE the caches in place.
"""

import torch

from .attention import _attention


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token n's key and value into cache slot slot_mapping[n], in place (vLLM's `reshape_and_cache_flash`).

    Args:
        key: [N, Hkv, D], the cache's dtype.
        value: [N, Hkv, D], the cache's dtype.
        key_cache: [num_blocks, block_size, Hkv, D]; MUTATED: the slots named in slot_mapping are overwritten.
        value_cache: [num_blocks, block_size, Hkv, D]; MUTATED like key_cache.
        slot_mapping: int64 [N]; token n goes to page slot // block_size, row slot % block_size. A negative slot
            (padding) is skipped. Non-negative slots must be distinct.

    Example:
        >>> key_cache, value_cache = torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)
        >>> key, value = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
        >>> reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([17, -1, 40]))
        >>> torch.equal(key_cache[1, 1], key[0]) and torch.equal(value_cache[2, 8], value[2])
        True
    """
    block_size = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache[slots // block_size, slots % block_size] = key[keep].to(key_cache.dtype)
    value_cache[slots // block_size, slots % block_size] = value[keep].to(value_cache.dtype)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | int | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Append new keys/values to a (paged or contiguous) cache, then attend over it (flash-attn's function).

    Args:
        q: [B, Sq, Hq, D], fp32, fp16 or bf16.
        k_cache: [num_blocks, block_size, Hkv, D] when block_table is given (paged), else [B, S_max, Hkv, D]
            (contiguous); q's dtype; Hq must be a multiple of Hkv. MUTATED when k is given.
        v_cache: k_cache's layout with the value head dim Dv. MUTATED when v is given.
        k: [B, Sq_new, Hkv, D] or None: new keys, written at positions cache_seqlens[b] ... before attending.
        v: [B, Sq_new, Hkv, Dv] or None: new values, given together with k.
        cache_seqlens: int32 [B] or an int: the number of valid entries of each sequence's cache before this call.
            None means the whole cache is valid (block_table.shape[1] * block_size, or S_max) and then k/v must be
            None (flash-attn requires cache_seqlens with k/v).
        block_table: int32 [B, max_blocks_per_seq]: sequence b's pages in order (entries past its length unused).
        softmax_scale: scale of q.k before the softmax; None means D ** -0.5.
        causal: mask keys after the bottom-right-aligned diagonal (the last query sees the last valid entry).
        window_size: (left, right) local window around the diagonal; -1 means unbounded on that side.

    Returns:
        [B, Sq, Hq, Dv] in q's dtype.

    Example (decode one token for 2 sequences holding 4 and 8 tokens, pages of 4 slots):
        >>> k_cache, v_cache = torch.zeros(8, 4, 1, 64), torch.zeros(8, 4, 1, 64)
        >>> block_table = torch.tensor([[3, 0, 0], [1, 2, 7]], dtype=torch.int32)
        >>> seqlens = torch.tensor([4, 8], dtype=torch.int32)
        >>> q, k, v = torch.randn(2, 1, 8, 64), torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64)
        >>> flash_attn_with_kvcache(q, k_cache, v_cache, k, v, seqlens, block_table).shape
        torch.Size([2, 1, 8, 64])
    """
    batch = q.shape[0]
    if block_table is None:  # contiguous: sequence b owns the single page b of S_max slots
        block_table = torch.arange(batch, device=q.device)[:, None]
    block_table = block_table.long()
    block_size = k_cache.shape[1]
    capacity = block_table.shape[1] * block_size

    if cache_seqlens is None:
        cache_seqlens = capacity
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, device=q.device)
    seqlens = cache_seqlens.tolist()
    num_new = 0 if k is None else k.shape[1]

    out = q.new_zeros(*q.shape[:3], v_cache.shape[-1])
    for b in range(batch):
        if k is not None:
            positions = torch.arange(seqlens[b], seqlens[b] + num_new, device=q.device)
            slots = block_table[b, positions // block_size] * block_size + positions % block_size
            reshape_and_cache(k[b], v[b], k_cache, v_cache, slots)
        positions = torch.arange(seqlens[b] + num_new, device=q.device)
        pages, rows = block_table[b, positions // block_size], positions % block_size
        keys, values = k_cache[pages, rows], v_cache[pages, rows]  # [seqlen, Hkv, D] gathered in position order
        out[b] = _attention(q[b : b + 1], keys[None], values[None], softmax_scale, causal, window_size)[0]
    return out
