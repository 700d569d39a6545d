"""Reference paged KV cache: writing tokens into pages, and attention that reads the keys from the cache.

A paged cache is a pool of `num_blocks` pages of `block_size` token slots each, [num_blocks, block_size, Hkv, D].
Slot s is page s // block_size, row s % block_size. Sequence b's block table row lists its pages in order, so its
position p lives in page block_table[b, p // block_size] at row p % block_size, i.e. in slot

    slot(b, p) = block_table[b, p // block_size] * block_size + p % block_size.

A contiguous cache [B, S_max, Hkv, D] is the special case of one page of S_max slots per sequence, with block
table [[0], [1], ..., [B - 1]]; `flash_attn_with_kvcache` treats it exactly so.

`flash_attn_with_kvcache` follows flash-attn 2.8.3: the new keys/values (if given) are written into the cache at
positions cache_seqlens[b] .. cache_seqlens[b] + Sq_new - 1, then the queries attend over the cache entries
[cache_leftpad[b], cache_seqlens[b] + Sq_new), masks aligned bottom-right as in qwen_fast.reference.attention:

    s[i, j] = softmax_scale * <q[i], k[j]>                   (fp32)
    s[i, j] = softcap * tanh(s[i, j] / softcap)               (only when softcap > 0: scale first, then cap)
    lse[i]  = log sum_j exp(s[i, j]) over the visible keys    (+inf for a row with no visible key, as flash-attn)
    o[i]    = sum_j exp(s[i, j] - lse[i]) * v[j]              (0 for a row with no visible key)

With rotary_cos/rotary_sin, q and the new k are first rotated (rotary_dim = 2 * rotary_cos.shape[1] leading dims of
each head, the rest untouched) at the cache positions they take: k row i at cache_seqlens[b] + i; q row i at
cache_seqlens[b] + i when causal or windowed, else every q row at cache_seqlens[b] (flash-attn's convention).

Both functions MUTATE the caches in place.
"""

import torch

from .attention import visible_keys


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    *,
    interleaved_v: bool = False,
) -> None:
    """Write token n's key and value into cache slot slot_mapping[n], in place (vLLM's `reshape_and_cache_flash`
    layout; vLLM's `reshape_and_cache` 5-D layout is not supported, see qwen_fast.reshape_and_cache).

    Args:
        key: [N, Hkv, D], the cache's dtype.
        value: [N, Hkv, D], the cache's dtype.
        key_cache: [num_blocks, block_size, Hkv, D]; MUTATED: the slots named in slot_mapping are overwritten.
        value_cache: [num_blocks, block_size, Hkv, D]; MUTATED like key_cache.
        slot_mapping: int64 [N]; token n goes to page slot // block_size, row slot % block_size. A negative slot
            (padding) is skipped. Non-negative slots must be distinct.
        kv_cache_dtype: "auto" (the caches hold key's dtype; the scales are unused, as in vLLM) or "fp8" /
            "fp8_e4m3" (the caches are float8_e4m3fn, or uint8 holding its bits, as vLLM allocates them): each
            element is stored as fp8(clamp(x / scale, -448, 448)), the division in fp32 (vLLM's saturating cast).
        k_scale, v_scale: fp32 tensors of one element (the dequantization scales), used with "fp8".
        interleaved_v: False only (checked by qwen_fast's API).

    Example:
        >>> key_cache, value_cache = torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)
        >>> key, value = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
        >>> reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([17, -1, 40]))
        >>> torch.equal(key_cache[1, 1], key[0]) and torch.equal(value_cache[2, 8], value[2])
        True
    """
    if kv_cache_dtype != "auto":
        key = (key.float() / k_scale.float().reshape(())).clamp(-448.0, 448.0)
        value = (value.float() / v_scale.float().reshape(())).clamp(-448.0, 448.0)
        key_cache, value_cache = (cache.view(torch.float8_e4m3fn) for cache in (key_cache, value_cache))
    block_size = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache[slots // block_size, slots % block_size] = key[keep].to(key_cache.dtype)
    value_cache[slots // block_size, slots % block_size] = value[keep].to(value_cache.dtype)


def reshape_and_cache_flash(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
) -> None:
    """vLLM's name of the same write: see `reshape_and_cache`."""
    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool):
    """x [B, S, H, D] with its first rotary_dim = 2 * cos.shape[1] dims of each head rotated at positions [B, S]
    (fp32 math, one rounding to x's dtype, as flash-attn's kernel)."""
    from .rope import apply_rotary_emb  # here: reference.rope imports this module's reshape_and_cache

    rotary_dim = 2 * cos.shape[1]
    table = torch.cat((cos, sin), dim=-1).float()
    rotated, _ = apply_rotary_emb(positions.long(), x[..., :rotary_dim], None, table, not interleaved)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def _attend(q, keys, values, scale, causal, window_size, softcap) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q [Sq, Hq, D] over keys/values [Sk, Hkv, D] -> (out [Sq, Hq, D] fp32, lse [Hq, Sq] fp32), with
    the math of the module docstring."""
    heads_q, heads_kv = q.shape[1], keys.shape[1]
    keys = keys.float().repeat_interleave(heads_q // heads_kv, dim=1)  # query head h reads kv head h // group
    values = values.float().repeat_interleave(heads_q // heads_kv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visible_keys(q.shape[0], keys.shape[0], causal, window_size, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where no key is visible
    blind = lse == float("-inf")
    probs = torch.exp(scores - lse.masked_fill(blind, 0.0)[..., None])  # exactly 0 at the invisible keys
    out = torch.einsum("hqk,khd->qhd", probs, values)
    return out, lse.masked_fill(blind, float("inf"))


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | int | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Append new keys/values to a (paged or contiguous) cache, then attend over it (flash-attn's function).

    Args:
        q: [B, Sq, Hq, D], fp32, fp16 or bf16.
        k_cache: [num_blocks, block_size, Hkv, D] when block_table is given (paged), else [B_cache, S_max, Hkv, D]
            (contiguous); q's dtype; Hq must be a multiple of Hkv. MUTATED when k is given.
        v_cache: k_cache's layout with the value head dim Dv. MUTATED when v is given.
        k: [B, Sq_new, Hkv, D] or None: new keys, written at positions cache_seqlens[b] ... before attending.
        v: [B, Sq_new, Hkv, Dv] or None: new values, given together with k.
        rotary_cos, rotary_sin: [seqlen_ro, rotary_dim / 2], q's dtype, or None: RoPE of q and k (needs k), see
            the module docstring. rotary_interleaved: True for GPT-J pairs (2i, 2i + 1), False for NeoX halves.
        cache_seqlens: int32 [B] or an int: the end of each sequence's valid entries before this call. None means
            the whole cache is valid (block_table.shape[1] * block_size, or S_max) and then k/v must be None.
        cache_batch_idx: int32 [B] or None: the row of a contiguous cache that sequence b uses (default b).
        cache_leftpad: int32 [B] or None: entries before cache_leftpad[b] are not attended to.
        block_table: int32 [B, max_blocks_per_seq]: sequence b's pages in order (entries past its length unused).
        softmax_scale: scale of q.k before the softmax; None means D ** -0.5.
        causal: mask keys after the bottom-right-aligned diagonal (the last query sees the last valid entry).
        window_size: (left, right) local window around the diagonal; -1 means unbounded on that side.
        softcap: > 0 caps the scores: softcap * tanh(scale * q.k / softcap).
        alibi_slopes: not supported (must be None). num_splits: a kernel schedule; no effect on the result.
        return_softmax_lse: also return the fp32 log-sum-exp [B, Hq, Sq] of the scores (+inf where no key).
        k_descale, v_descale: for an fp8 cache (float8_e4m3fn, or uint8 holding its bits; no k/v append): fp32
            [B, Hkv] or one element; the cache entries are read as fp8 * descale (per sequence and KV head).

    Returns:
        [B, Sq, Hq, Dv] in q's dtype, or (that, softmax_lse fp32 [B, Hq, Sq]) with return_softmax_lse.

    Example (decode one token for 2 sequences holding 4 and 8 tokens, pages of 4 slots):
        >>> k_cache, v_cache = torch.zeros(8, 4, 1, 64), torch.zeros(8, 4, 1, 64)
        >>> block_table = torch.tensor([[3, 0, 0], [1, 2, 7]], dtype=torch.int32)
        >>> seqlens = torch.tensor([4, 8], dtype=torch.int32)
        >>> q, k, v = torch.randn(2, 1, 8, 64), torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64)
        >>> flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=block_table).shape
        torch.Size([2, 1, 8, 64])
    """
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported by qwen_fast: pass None")
    batch, seqlen_q = q.shape[:2]
    if block_table is None:  # contiguous: sequence b owns the single page cache_batch_idx[b] (default b) of S_max
        rows = torch.arange(batch, device=q.device) if cache_batch_idx is None else cache_batch_idx
        block_table = rows[:, None]
    block_table = block_table.long()
    block_size = k_cache.shape[1]
    if cache_seqlens is None:
        cache_seqlens = block_table.shape[1] * block_size
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, device=q.device)
    cache_seqlens = cache_seqlens.long()
    num_new = 0 if k is None else k.shape[1]
    if rotary_cos is not None:
        steps = torch.arange(seqlen_q, device=q.device)
        moving = causal or tuple(window_size) != (-1, -1)
        q = _rotary(q, rotary_cos, rotary_sin, cache_seqlens[:, None] + steps * moving, rotary_interleaved)
        k_positions = cache_seqlens[:, None] + torch.arange(num_new, device=q.device)
        k = _rotary(k, rotary_cos, rotary_sin, k_positions, rotary_interleaved)
    starts = [0] * batch if cache_leftpad is None else cache_leftpad.tolist()
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if k_descale is not None:  # fp8 cache: entries read as fp8 * descale [B, Hkv]
        k_cache, v_cache = (c.view(torch.float8_e4m3fn) for c in (k_cache, v_cache))
        k_descale, v_descale = (d.float().expand(batch, k_cache.shape[2]) for d in (k_descale, v_descale))

    out = q.new_zeros(*q.shape[:3], v_cache.shape[-1])
    lse = torch.empty(batch, q.shape[2], seqlen_q, dtype=torch.float32, device=q.device)
    for b, length in enumerate(cache_seqlens.tolist()):
        if k is not None:
            positions = torch.arange(length, length + num_new, device=q.device)
            slots = block_table[b, positions // block_size] * block_size + positions % block_size
            reshape_and_cache(k[b], v[b], k_cache, v_cache, slots)
        positions = torch.arange(starts[b], length + num_new, device=q.device)
        pages, rows = block_table[b, positions // block_size], positions % block_size
        keys, values = k_cache[pages, rows], v_cache[pages, rows]  # [seqlen, Hkv, D] gathered in position order
        if k_descale is not None:
            keys, values = keys.float() * k_descale[b, :, None], values.float() * v_descale[b, :, None]
        out_b, lse[b] = _attend(q[b], keys, values, scale, causal, window_size, softcap)
        out[b] = out_b.to(q.dtype)
    return (out, lse) if return_softmax_lse else out
