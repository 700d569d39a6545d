"""GQAAttention: a drop-in for the attention modules of Qwen3, Qwen3-MoE, Qwen2 and Qwen2-MoE in transformers 5.x.

Per call, with hidden_states [B, S, H] and the model's rotary (cos, sin) [B, S, D]:

    q, k, v  = q_proj(x), k_proj(x), v_proj(x) as [B, S, heads, D]    (flash-attn's layout: no transposes)
    q, k     = q_norm(q), k_norm(k)                                    (Qwen3 families: RMSNorm over D, per head)
    q, k     = rotate-half RoPE (qwen_fast.rotary_embedding with a table made of transformers' cos/sin, in the
               model dtype: transformers' operands and roundings)
    attention, causal (bottom-right aligned), GQA without repeating K/V, optional sliding window:
      - a qwen_fast.PagedKVCache and no padding (the serving path): qk_norm_rope_and_cache normalises and rotates
        q and k and writes k and v into the pages in one pass (Qwen2: rotary_embedding, then reshape_and_cache), and
        flash_attn_with_kvcache reads the keys straight from the pages (block_table, cache_seqlens): nothing is
        gathered; the prefill of an empty cache attends over the new rows with flash_attn_func instead;
      - any other transformers Cache (or a padded batch on a PagedKVCache): cache.update(k, v) returns the layer's
        keys, then flash_attn_func;
      - padding (a 2D [B, S_k] mask, or transformers' 4D causal mask with padding): the valid query and key rows are
        packed and run through flash_attn_varlen_func; the output rows of padding queries are 0.
    out      = o_proj(attention)

The attention ops pick their backend per call like every qwen_fast op (`qwen_fast.use_backend`). A 4D mask that is
not "causal (with the layer's window) and key padding" is refused with an error rather than approximated. The module
is for inference: attention dropout is not applied.
"""

import torch
from torch import nn

from qwen_fast.ops import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    qk_norm_rope_and_cache,
    reshape_and_cache,
    rotary_embedding,
)
from qwen_fast.reference.attention import visible_keys
from qwen_fast.reference.norm import rms_norm

SUPPORTED = ("Qwen3Attention", "Qwen3MoeAttention", "Qwen2Attention", "Qwen2MoeAttention")


class HeadRMSNorm(nn.Module):
    """RMSNorm over the head dim with Qwen3's casts (qwen_fast.reference.norm.rms_norm); transformers' parameter
    and attribute names (weight, variance_epsilon)."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)


def _rope_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' per-token (cos, sin) [B, S, D] (each half repeated) as a rotary_embedding table [B * S, D] =
    [cos | sin] over the D / 2 frequencies, row t for token t: the rotation then runs with transformers' operands and
    roundings (the table is in the model dtype)."""
    half = cos.shape[-1] // 2
    return torch.cat((cos[..., :half], sin[..., :half]), dim=-1).reshape(-1, cos.shape[-1]).contiguous()


def key_padding(attention_mask: torch.Tensor | None, num_q: int, window_left: int) -> torch.Tensor | None:
    """bool [B, S_k] (True = a real token) from transformers' attention mask, or None when nothing is padded.

    Accepts None, a 2D [B, S_k] 0/1 mask, or a 4D [B, 1, S_q, S_k] mask (bool: True = attend; float: 0 = attend,
    a large negative number = masked). A 4D mask must be exactly the causal (windowed) mask restricted to the keys
    some query sees; anything else raises ValueError. With a window, padding must not sit between tokens.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        keep = attention_mask.bool()
    elif attention_mask.dim() == 4:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        if allowed.shape[1] != 1 or allowed.shape[2] != num_q:
            raise ValueError(
                f"attention_mask must be [B, 1, S_q, S_k] with S_q = {num_q}, got {tuple(attention_mask.shape)}"
            )
        keep = allowed[:, 0].any(dim=1)  # a key no query may see is as good as padding
        expected = visible_keys(num_q, keep.shape[1], True, (window_left, 0), keep.device)[None] & keep[:, None, :]
        if not torch.equal(allowed[:, 0], expected):
            raise ValueError(
                "qwen_fast attention supports causal attention masks with key padding only; attention_mask differs "
                f"from the causal mask (window_left={window_left}) of its padding"
            )
    else:
        raise ValueError(
            f"attention_mask must be 2D [B, S_k] or 4D [B, 1, S_q, S_k], got {tuple(attention_mask.shape)}"
        )
    if bool(keep.all()):
        return None
    if window_left >= 0:
        # Packing the valid tokens preserves window distances only if no padding sits between two of them.
        starts = (keep[:, 1:] & ~keep[:, :-1]).sum(dim=1) + keep[:, 0]
        if bool((starts > 1).any()):
            raise ValueError(
                "qwen_fast attention with a sliding window needs each sequence's tokens contiguous (padding only "
                "before or after them), got padding between tokens"
            )
    return keep


def varlen_attention(q, k, v, keep, scale, window) -> torch.Tensor:
    """Attention of the valid rows only: q [B, S_q, Hq, D], k/v [B, S_k, Hkv, D], keep bool [B, S_k]."""
    keep_q = keep[:, keep.shape[1] - q.shape[1] :]
    cu_q, cu_k = (torch.nn.functional.pad(m.sum(1).cumsum(0), (1, 0)).to(torch.int32) for m in (keep_q, keep))
    # max_seqlen_q/k are upper bounds (flash-attn's contract): the padded lengths, known without a host sync.
    rows = flash_attn_varlen_func(
        q[keep_q], k[keep], v[keep], cu_q, cu_k, q.shape[1], k.shape[1],
        softmax_scale=scale, causal=True, window_size=window,
    )  # fmt: skip
    out = q.new_zeros(q.shape)
    out[keep_q] = rows
    return out


class GQAAttention(nn.Module):
    """Grouped-query attention of Qwen3 / Qwen3-MoE (with q/k RMSNorm) and Qwen2 / Qwen2-MoE, on qwen_fast's ops.

    Same parameter names as transformers (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm) and the same forward
    signature as its attention modules, so it can replace `layer.self_attn` in place (see `from_hf`).

    Args:
        hidden_size: H.
        num_heads, num_kv_heads: Hq and Hkv (Hq % Hkv == 0).
        head_dim: D.
        qkv_bias: bias on q/k/v projections (Qwen2: True); o_proj never has one here (from_hf keeps HF's modules).
        qk_norm: RMSNorm over D of q and k before RoPE (Qwen3 families).
        rms_norm_eps: its epsilon.
        layer_idx: this layer's index in a transformers Cache.
        sliding_window: keys per query (the query's own included), or None for full attention.

    Example:
        >>> attn = GQAAttention(hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=16)
        >>> x, cos, sin = torch.randn(2, 5, 64), torch.ones(2, 5, 16), torch.zeros(2, 5, 16)
        >>> attn(x, (cos, sin), None)[0].shape
        torch.Size([2, 5, 64])
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        qk_norm: bool = True,
        rms_norm_eps: float = 1e-6,
        layer_idx: int = 0,
        sliding_window: int | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.head_dim, self.layer_idx, self.sliding_window = head_dim, layer_idx, sliding_window
        self.scaling = head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = HeadRMSNorm(head_dim, rms_norm_eps) if qk_norm else None
        self.k_norm = HeadRMSNorm(head_dim, rms_norm_eps) if qk_norm else None

    @classmethod
    def from_hf(cls, attention: nn.Module) -> "GQAAttention":
        """A GQAAttention that shares `attention`'s submodules (and so its parameters: nothing is copied).

        Supported: transformers' Qwen3Attention, Qwen3MoeAttention, Qwen2Attention, Qwen2MoeAttention.
        """
        name = type(attention).__name__
        if name not in SUPPORTED:
            raise TypeError(f"GQAAttention.from_hf supports {', '.join(SUPPORTED)}; got {name}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.head_dim, module.layer_idx = attention.head_dim, attention.layer_idx
        module.scaling, module.sliding_window = attention.scaling, getattr(attention, "sliding_window", None)
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(module, part, getattr(attention, part))
        module.q_norm = getattr(attention, "q_norm", None)
        module.k_norm = getattr(attention, "k_norm", None)
        return module

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states [B, S, H], position_embeddings (cos, sin) [B, S, D], attention_mask None / 2D / 4D,
        cache a transformers Cache (transformers < 5.24 passes it as past_key_values) -> ([B, S, H], None)."""
        from qwen_fast.cache import PagedKVCache

        cache = cache if cache is not None else past_key_values
        batch, seq, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim)
        table = _rope_table(*position_embeddings)
        # Row of token (b, s) in the table: transformers' cos/sin are [B, S, D], or [1, S, D] shared by the batch.
        rows = position_embeddings[0].shape[0]
        positions = torch.arange(rows * seq, device=hidden_states.device).view(rows, seq).expand(batch, seq)
        positions = positions.reshape(-1)
        window = (-1, -1) if self.sliding_window is None else (self.sliding_window - 1, 0)
        keep = key_padding(attention_mask, seq, window[0])

        if isinstance(cache, PagedKVCache) and keep is None:
            # Serving path: the new k/v go straight into the pages and attention reads the pages in place.
            start, block_table, slots = cache.reserve_layer(self.layer_idx, k)
            key_cache, value_cache = cache.key_caches[self.layer_idx], cache.value_caches[self.layer_idx]
            q_rows, k_rows, v_rows = (t.reshape(batch * seq, -1, self.head_dim) for t in (q, k, v))
            if self.q_norm is not None:  # one pass: q/k RMSNorm, RoPE, cache write
                q_rows, k_rows = qk_norm_rope_and_cache(
                    q_rows, k_rows, v_rows, self.q_norm.weight, self.k_norm.weight, self.q_norm.variance_epsilon,
                    positions, table, key_cache, value_cache, slots,
                )  # fmt: skip
            else:
                q_rows, k_rows = rotary_embedding(positions, q_rows, k_rows, table)
                reshape_and_cache(k_rows, v_rows, key_cache, value_cache, slots)
            if start == 0 and seq > 1:
                # Prefill of an empty cache: the keys are exactly the new rows, so the prefill kernel attends over
                # them where they are (the paged kernel's loop is shaped for a few queries per sequence).
                out = flash_attn_func(
                    q_rows.view(q.shape), k_rows.view(k.shape), v, softmax_scale=self.scaling, causal=True,
                    window_size=window,
                )  # fmt: skip
            else:
                out = flash_attn_with_kvcache(
                    q_rows.view(q.shape), key_cache, value_cache, cache_seqlens=start + seq, block_table=block_table,
                    softmax_scale=self.scaling, causal=True, window_size=window,
                )  # fmt: skip
            return self.o_proj(out.reshape(batch, seq, -1)), None

        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary_embedding(positions.view(batch, seq), q, k, table)
        if cache is not None:
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if keep is None:
            out = flash_attn_func(q, k, v, softmax_scale=self.scaling, causal=True, window_size=window)
        else:
            out = varlen_attention(q, k, v, keep, self.scaling, window)
        return self.o_proj(out.reshape(batch, seq, -1)), None
