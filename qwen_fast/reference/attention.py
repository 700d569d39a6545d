"""Reference attention with flash-attn semantics: dense batches and packed variable-length batches.

For one sequence with Sq queries and Sk keys, query head h reads key/value head h // (Hq // Hkv) (GQA; MQA when
Hkv = 1, MHA when Hkv = Hq) and

    s[i, j] = softmax_scale * <q[i], k[j]>                      (fp32; softmax_scale defaults to D ** -0.5)
    s[i, j] = softcap * tanh(s[i, j] / softcap)                  (only when softcap > 0: flash-attn's soft capping)
    p[i, :] = softmax over the visible keys j of s[i, j]         (fp32; invisible keys get probability 0)
    o[i]    = sum_j p[i, j] * v[j]                               (fp32, cast to q's dtype at the end)
    lse[i]  = log sum_j exp(s[i, j]) over the visible keys j     (fp32, natural log; +inf for a row with no key)

Query i is aligned with key d(i) = i + Sk - Sq (bottom-right, as flash-attn: the last query sees the last key).
With window_size = (left, right), -1 meaning unbounded, key j is visible iff d(i) - left <= j <= d(i) + right;
causal=True additionally requires j <= d(i) (it sets right to 0). A query row with no visible key (e.g. the first
Sq - Sk rows of a causal call with Sq > Sk) outputs 0, never NaN, and its lse is +inf: flash-attn 2.8.3 writes
INFINITY there (csrc/flash_attn/src/softmax.h, the non-split path), so that exp(s - lse) is 0 in a backward pass.

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


def check_inference_only(dropout_p: object, alibi_slopes: object) -> None:
    """qwen_fast's attention is inference-only: dropout_p must be 0 and alibi_slopes None (flash-attn's training /
    ALiBi arguments are accepted at those values only, so that flash-attn's positional calls keep their meaning)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__} {dropout_p!r}")
    if dropout_p != 0:
        raise ValueError(
            f"dropout_p={dropout_p!r} is not supported: dropout is a training feature and qwen_fast is "
            "inference-only (pass dropout_p=0.0)"
        )
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported by qwen_fast (ALiBi biases are not implemented); pass None")


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None,
    causal: bool,
    window_size: tuple[int, int],
    softcap: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The attention math shared by every reference: fp32 scores and softmax, masked rows give 0.

    Args:
        q: [B, Sq, Hq, D], any float dtype.
        k: [B, Sk, Hkv, D], Hq a multiple of Hkv.
        v: [B, Sk, Hkv, Dv].
        softmax_scale: multiplies q.k; None means D ** -0.5.
        causal, window_size: the mask, see the module docstring.
        softcap: > 0 caps the scaled scores to (-softcap, softcap) by softcap * tanh(s / softcap); 0 is off.
        return_lse: also return the rows' log-sum-exp.

    Returns:
        [B, Sq, Hq, Dv] in q's dtype; with return_lse also lse fp32 [B, Hq, Sq] (+inf for a row with no key).
    """
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    seqlen_k, num_heads_kv = k.shape[1], k.shape[2]
    group = num_heads_q // num_heads_kv  # query heads per key/value head
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale

    # Query head h = g_kv * group + r reads key/value head g_kv: split Hq into (Hkv, group).
    q32 = q.float().reshape(batch, seqlen_q, num_heads_kv, group, head_dim)
    scores = torch.einsum("bqhrd,bkhd->bhrqk", q32, k.float()) * scale  # [B, Hkv, group, Sq, Sk]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)

    visible = visible_keys(seqlen_q, seqlen_k, causal, window_size, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row with no visible key is all -inf and softmax gives NaN there; zeroing the invisible entries turns exactly
    # those rows into 0 (in any other row softmax already gave the invisible keys probability 0).
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)

    out = torch.einsum("bhrqk,bkhd->bqhrd", probs, v.float())  # [B, Sq, Hkv, group, Dv]
    out = out.reshape(batch, seqlen_q, num_heads_q, v.shape[-1]).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~visible.any(dim=-1), float("inf"))  # empty row: +inf
    return out, lse.reshape(batch, num_heads_q, seqlen_q)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention over a dense batch, flash-attn's `flash_attn_func` (inference: dropout_p 0, no alibi_slopes).

    Args:
        q: [B, Sq, Hq, D], fp32, fp16 or bf16.
        k: [B, Sk, Hkv, D], q's dtype; Hq must be a multiple of Hkv.
        v: [B, Sk, Hkv, Dv], q's dtype.
        dropout_p: 0.0 only.
        softmax_scale: scale of q.k before the softmax; None means D ** -0.5.
        causal: mask keys after the query's bottom-right-aligned diagonal.
        window_size: (left, right) local window around the diagonal; -1 means unbounded on that side.
        softcap: > 0 caps the scores (see the module docstring); 0.0 is off.
        alibi_slopes: None only.
        deterministic: accepted and ignored (this is deterministic).
        return_attn_probs: also return softmax_lse and flash-attn's S_dmask (see below).

    Returns:
        [B, Sq, Hq, Dv] in q's dtype; with return_attn_probs (out, softmax_lse fp32 [B, Hq, Sq], an empty tensor
        of q's dtype: what flash-attn returns as S_dmask when dropout_p is 0).

    Example:
        >>> q, k, v = torch.randn(2, 5, 8, 64), torch.randn(2, 7, 2, 64), torch.randn(2, 7, 2, 64)
        >>> flash_attn_func(q, k, v, causal=True).shape
        torch.Size([2, 5, 8, 64])
    """
    check_inference_only(dropout_p, alibi_slopes)
    out, lse = _attention(q, k, v, softmax_scale, causal, window_size, softcap, return_lse=True)
    return (out, lse, q.new_empty(0)) if return_attn_probs else out


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention over sequences packed along the token dimension, flash-attn's `flash_attn_varlen_func`.

    Sequence b owns queries cu_seqlens_q[b] : cu_seqlens_q[b + 1] and keys cu_seqlens_k[b] : cu_seqlens_k[b + 1];
    each is attended independently, with causal/window alignment taken per sequence (bottom-right). A sequence may
    be empty (its queries, if any, then output 0). Query rows not covered by cu_seqlens_q output 0 (lse +inf).

    Args:
        q: [Tq, Hq, D], fp32, fp16 or bf16.
        k: [Tk, Hkv, D], q's dtype; Hq must be a multiple of Hkv.
        v: [Tk, Hkv, Dv], q's dtype.
        cu_seqlens_q: int32 [B + 1], non-decreasing query offsets, cu_seqlens_q[0] = 0.
        cu_seqlens_k: int32 [B + 1], non-decreasing key offsets, cu_seqlens_k[0] = 0.
        max_seqlen_q: the longest query sequence (kernels size their grid with it; unused here).
        max_seqlen_k: the longest key sequence (unused here).
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic: as `flash_attn_func`.
        return_attn_probs: also return softmax_lse fp32 [Hq, Tq] and an empty S_dmask (as `flash_attn_func`).
        block_table: None only (paged keys: use flash_attn_with_kvcache).

    Returns:
        [Tq, Hq, Dv] in q's dtype, or (out, softmax_lse, S_dmask) with return_attn_probs.

    Example:
        >>> cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
        >>> q, k, v = torch.randn(7, 4, 64), torch.randn(7, 1, 64), torch.randn(7, 1, 64)
        >>> flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True).shape
        torch.Size([7, 4, 64])
    """
    check_inference_only(dropout_p, alibi_slopes)
    if block_table is not None:
        raise ValueError("block_table is not supported by flash_attn_varlen_func here; use flash_attn_with_kvcache")
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), device=q.device)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        rows = slice(starts_q[b], starts_q[b + 1])
        keys = slice(starts_k[b], starts_k[b + 1])
        out_b, lse_b = _attention(
            q[None, rows], k[None, keys], v[None, keys], softmax_scale, causal, window_size, softcap, return_lse=True
        )
        out[rows], lse[:, rows] = out_b[0], lse_b[0]
    return (out, lse, q.new_empty(0)) if return_attn_probs else out
