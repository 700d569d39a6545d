"""Reference attention with flash-attn semantics: dense batches and packed variable-length batches.

For one sequence with Sq queries and Sk keys, query head h reads key/value head h // (Hq // Hkv) (GQA; MQA when
Hkv = 1, MHA when Hkv = Hq) and

    s[i, j] = softmax_scale * <q[i], k[j]>                      (fp32; softmax_scale defaults to D ** -0.5)
    p[i, :] = softmax over the visible keys j of s[i, j]         (fp32; invisible keys get probability 0)
    o[i]    = sum_j p[i, j] * v[j]                               (fp32, cast to q's dtype at the end)

Query i is aligned with key d(i) = i + Sk - Sq (bottom-right, as flash-attn: the last query sees the last key).
With window_size = (left, right), -1 meaning unbounded, key j is visible iff d(i) - left <= j <= d(i) + right;
causal=True additionally requires j <= d(i) (it sets right to 0). A query row with no visible key (e.g. the first
Sq - Sk rows of a causal call with Sq > Sk) outputs 0, never NaN.

Every attention reference here runs through `_attention`, the single statement of the masking and softmax math;
qwen_fast.reference.kv_cache.flash_attn_with_kvcache adds softcap and the log-sum-exp on the same `visible_keys`.
"""

import torch


def visible_keys(
    seqlen_q: int, seqlen_k: int, causal: bool, window_size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """bool [Sq, Sk]: whether query i may attend to key j (bottom-right aligned, see the module docstring)."""
    left, right = window_size
    if causal:
        right = 0  # as flash-attn: causal overrides the right edge of the window
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diagonal = i + seqlen_k - seqlen_q  # the key aligned with query i
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= diagonal - left
    if right >= 0:
        visible &= j <= diagonal + right
    return visible


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
) -> torch.Tensor:
    """The attention math shared by every reference: fp32 scores and softmax, masked rows give 0.

    Args:
        q: [B, Sq, Hq, D], any float dtype.
        k: [B, Sk, Hkv, D], Hq a multiple of Hkv.
        v: [B, Sk, Hkv, Dv].
        softmax_scale: multiplies q.k; None means D ** -0.5.
        causal, window_size: the mask, see the module docstring.

    Returns:
        [B, Sq, Hq, Dv] in q's dtype.
    """
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    seqlen_k, num_heads_kv = k.shape[1], k.shape[2]
    group = num_heads_q // num_heads_kv  # query heads per key/value head
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale

    # Query head h = g_kv * group + r reads key/value head g_kv: split Hq into (Hkv, group).
    q32 = q.float().reshape(batch, seqlen_q, num_heads_kv, group, head_dim)
    scores = torch.einsum("bqhrd,bkhd->bhrqk", q32, k.float()) * scale  # [B, Hkv, group, Sq, Sk]

    visible = visible_keys(seqlen_q, seqlen_k, causal, window_size, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row with no visible key is all -inf and softmax gives NaN there; zeroing the invisible entries turns exactly
    # those rows into 0 (in any other row softmax already gave the invisible keys probability 0).
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)

    out = torch.einsum("bhrqk,bkhd->bqhrd", probs, v.float())  # [B, Sq, Hkv, group, Dv]
    return out.reshape(batch, seqlen_q, num_heads_q, v.shape[-1]).to(q.dtype)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Attention over a dense batch, flash-attn's `flash_attn_func` (without dropout, softcap, alibi).

    Args:
        q: [B, Sq, Hq, D], fp32, fp16 or bf16.
        k: [B, Sk, Hkv, D], q's dtype; Hq must be a multiple of Hkv.
        v: [B, Sk, Hkv, Dv], q's dtype.
        softmax_scale: scale of q.k before the softmax; None means D ** -0.5.
        causal: mask keys after the query's bottom-right-aligned diagonal.
        window_size: (left, right) local window around the diagonal; -1 means unbounded on that side.

    Returns:
        [B, Sq, Hq, Dv] in q's dtype.

    Example:
        >>> q, k, v = torch.randn(2, 5, 8, 64), torch.randn(2, 7, 2, 64), torch.randn(2, 7, 2, 64)
        >>> flash_attn_func(q, k, v, causal=True).shape
        torch.Size([2, 5, 8, 64])
    """
    return _attention(q, k, v, softmax_scale, causal, window_size)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Attention over sequences packed along the token dimension, flash-attn's `flash_attn_varlen_func`.

    Sequence b owns queries cu_seqlens_q[b] : cu_seqlens_q[b + 1] and keys cu_seqlens_k[b] : cu_seqlens_k[b + 1];
    each is attended independently, with causal/window alignment taken per sequence (bottom-right). A sequence may
    be empty (its queries, if any, then output 0). Query rows not covered by cu_seqlens_q output 0.

    Args:
        q: [Tq, Hq, D], fp32, fp16 or bf16.
        k: [Tk, Hkv, D], q's dtype; Hq must be a multiple of Hkv.
        v: [Tk, Hkv, Dv], q's dtype.
        cu_seqlens_q: int32 [B + 1], non-decreasing query offsets, cu_seqlens_q[0] = 0.
        cu_seqlens_k: int32 [B + 1], non-decreasing key offsets, cu_seqlens_k[0] = 0.
        max_seqlen_q: the longest query sequence (kernels size their grid with it; unused here).
        max_seqlen_k: the longest key sequence (unused here).
        softmax_scale, causal, window_size: as in `flash_attn_func`.

    Returns:
        [Tq, Hq, Dv] in q's dtype.

    Example:
        >>> cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
        >>> q, k, v = torch.randn(7, 4, 64), torch.randn(7, 1, 64), torch.randn(7, 1, 64)
        >>> flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True).shape
        torch.Size([7, 4, 64])
    """
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        q_b = q[starts_q[b] : starts_q[b + 1]]
        k_b = k[starts_k[b] : starts_k[b + 1]]
        v_b = v[starts_k[b] : starts_k[b + 1]]
        out[starts_q[b] : starts_q[b + 1]] = _attention(
            q_b[None], k_b[None], v_b[None], softmax_scale, causal, window_size
        )[0]
    return out
