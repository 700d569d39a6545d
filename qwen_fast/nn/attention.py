"""GQAAttention: a drop-in for the attention modules of Qwen3, Qwen3-MoE, Qwen2 and Qwen2-MoE in transformers 5.x.

Per call, with hidden_states [B, S, H] and the model's rotary (cos, sin) [B, S, D]:

    q, k, v  = q_proj(x), k_proj(x), v_proj(x) as [B, S, heads, D]    (flash-attn's layout: no transposes)
    q, k     = q_norm(q), k_norm(k)                                    (Qwen3 families: RMSNorm over D, per head)
    q, k     = rotate-half RoPE (qwen_fast.rotary_embedding with a table made of transformers' cos/sin, in the
               model dtype: transformers' operands and roundings)
    attention, causal (bottom-right aligned), GQA without repeating K/V, optional sliding window:
      - a qwen_fast.PagedKVCache and no mask (the serving path; the "qwen_fast" mask implementation, which
        qwen_fast.patch selects, passes None when nothing is padded): layer 0 makes the step's plan (the pages of the
        new tokens, their slots, the RoPE rows; qwen_fast/cache/step_plan.py) and every layer makes two op calls:
        qk_norm_rope_and_cache (q/k RMSNorm, RoPE, k and v into the pages in one pass; Qwen2: rotary_embedding, then
        reshape_and_cache) and flash_attn_with_kvcache over the pages in place (the plan's block_table and lengths):
        nothing is gathered, and the traced step holds only fixed-shape device tensors, so torch.compile compiles
        it once; an eager prefill of an empty cache attends over its own rows with flash_attn_func instead, and
        eager steps pass the host-known longest sequence (the decode kernel's split count; a chunk onto a
        non-empty cache then runs the triton prefill kernel over the keys gathered once);
      - transformers' continuous batching (`generate_batch`, its paged cache and packed rows): the same fused write
        into its pages, then the varlen kernel for prefill chunks and flash_attn_with_kvcache over the pages in place
        for decode (qwen_fast/nn/batched_attention.py);
      - any other transformers Cache (or a mask on a PagedKVCache): cache.update(k, v) returns the layer's keys, then
        qwen_fast/nn/cached_attention.py chooses from shapes and positions (StaticCache's unwritten slots are never
        read) and packs padded batches for flash_attn_varlen_func with fixed shapes; padding queries output 0.
    out      = o_proj(attention)

The projections go through qwen_fast.nn.linear.project: the linear op at decode sizes on CPU (M <= 16 rows),
transformers' nn.Linear otherwise. The ops run through their op entries (qwen_fast.ops.FLASH_ATTN_WITH_KVCACHE,
...): they pick their backend like every qwen_fast op (`qwen_fast.use_backend`), without the functional API's
per-call input checks, since the module builds their arguments itself. A 4D mask that is not "causal (with the
layer's window) and key padding" is refused with an error rather than approximated. The module is for inference:
attention dropout is not applied.
"""

import torch
from torch import nn

from qwen_fast.ops import (
    FLASH_ATTN,
    FLASH_ATTN_WITH_KVCACHE,
    QK_NORM_ROPE_AND_CACHE,
    RESHAPE_AND_CACHE,
    ROTARY_EMBEDDING,
)
from qwen_fast.reference.norm import rms_norm

from . import _hf
from .batched_attention import batched_attention, is_continuous_batching
from .cached_attention import attend
from .linear import project


class HeadRMSNorm(nn.Module):
    """RMSNorm over the head dim with Qwen3's casts (qwen_fast.reference.norm.rms_norm); transformers' parameter
    and attribute names (weight, variance_epsilon)."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)


def rope_rows(cos: torch.Tensor, sin: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' per-token (cos, sin) [B or 1, S, D] (each half repeated) as a rotary_embedding table [rows * S,
    D] = [cos | sin] over the D / 2 frequencies (in the model dtype: the rotation then runs with transformers'
    operands and roundings), and the int64 [B * S] table row of each token (b-major): row b * S + s, or s when the
    batch shares one [1, S, D]."""
    half, seq = cos.shape[-1] // 2, cos.shape[1]
    table = torch.cat((cos[..., :half], sin[..., :half]), dim=-1).reshape(-1, cos.shape[-1])
    positions = torch.arange(cos.shape[0] * seq, device=cos.device).view(cos.shape[0], seq).expand(batch, seq)
    return table, positions.reshape(-1)


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
        >>> with torch.no_grad():  # inference: the kernels have no backward
        ...     attn(x, (cos, sin), None)[0].shape
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

        Supported: the attention classes of the families served by module (qwen_fast/families/: Qwen3Attention,
        Qwen3MoeAttention, Qwen2Attention, Qwen2MoeAttention).
        """
        _hf.lookup(_hf.ATTENTION, attention, "GQAAttention.from_hf")
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
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states [B, S, H], position_embeddings (cos, sin) [B or 1, S, D], attention_mask None / 2D / 4D,
        cache a transformers Cache (transformers < 5.24 passes it as past_key_values), position_ids [B or 1, S]
        -> ([B, S, H], None)."""
        cache = cache if cache is not None else past_key_values
        batch, seq, _ = hidden_states.shape
        q = project(self.q_proj, hidden_states).view(batch, seq, -1, self.head_dim)
        k = project(self.k_proj, hidden_states).view(batch, seq, -1, self.head_dim)
        v = project(self.v_proj, hidden_states).view(batch, seq, -1, self.head_dim)
        window = (-1, -1) if self.sliding_window is None else (self.sliding_window - 1, 0)
        if attention_mask is None and hasattr(cache, "plan_layer"):  # a qwen_fast.PagedKVCache
            out = self._paged(cache, q, k, v, position_embeddings, window)
            return project(self.o_proj, out.reshape(batch, seq, -1)), None

        table, positions = rope_rows(*position_embeddings, batch)
        table = table.contiguous()
        q_rows, k_rows, v_rows = (t.reshape(batch * seq, -1, self.head_dim) for t in (q, k, v))
        if is_continuous_batching(cache, kwargs):  # transformers' generate_batch: its pages, read in place
            out = batched_attention(self, cache, q_rows, k_rows, v_rows, (table, positions), kwargs, window)
            return project(self.o_proj, out.reshape(batch, seq, -1)), None
        q, k = self.norm_and_rope(q_rows, k_rows, positions, table)
        q, k = q.view(batch, seq, -1, self.head_dim), k.view(batch, seq, -1, self.head_dim)
        if cache is not None:
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        out = attend(q, k, v, attention_mask, position_ids, self.scaling, True, window)
        return project(self.o_proj, out.reshape(batch, seq, -1)), None

    def norm_and_rope(self, q_rows, k_rows, positions, table) -> tuple[torch.Tensor, torch.Tensor]:
        """q/k rows [N, heads, D] after the q/k RMSNorm (Qwen3 families) and RoPE (rows `positions` of `table`)."""
        if self.q_norm is not None:
            q_rows, k_rows = self.q_norm(q_rows), self.k_norm(k_rows)
        return ROTARY_EMBEDDING(q_rows.device, positions, q_rows, k_rows, table, True)

    def _paged(self, cache, q, k, v, position_embeddings, window) -> torch.Tensor:
        """The serving path: the step plan's slots, the fused q/k norm + RoPE + page write, attention over the pages
        in place. Two op calls per layer; the plan (pages, RoPE rows) is made once per step by layer 0."""
        batch, seq = q.shape[:2]
        device = q.device
        plan = cache.plan_layer(self.layer_idx, batch, seq)
        if plan.rope is None:
            table, positions = rope_rows(*position_embeddings, batch)
            plan.rope = (table.contiguous(), positions)
        table, positions = plan.rope
        key_cache, value_cache = cache.key_caches[self.layer_idx], cache.value_caches[self.layer_idx]
        q_rows = q.reshape(batch * seq, -1, self.head_dim)
        k_rows = k.reshape(batch * seq, -1, self.head_dim)
        v_rows = v.reshape(batch * seq, -1, self.head_dim)
        if self.q_norm is not None:
            q_rows, k_rows = QK_NORM_ROPE_AND_CACHE(
                device, q_rows, k_rows, v_rows, self.q_norm.weight, self.k_norm.weight,
                float(self.q_norm.variance_epsilon), positions, table, key_cache, value_cache, plan.slots, True,
            )  # fmt: skip
        else:
            q_rows, k_rows = ROTARY_EMBEDDING(device, positions, q_rows, k_rows, table, True)
            RESHAPE_AND_CACHE(device, k_rows.contiguous(), v_rows.contiguous(), key_cache, value_cache, plan.slots)
        if seq > 1 and not torch.compiler.is_compiling() and not any(cache._step_starts):
            # Prefill of an empty cache (known on the host when eager): the keys are exactly the new rows, so the
            # prefill kernel attends over them where they are (the paged kernel's loop is shaped for few queries).
            rows_k = k_rows.view(k.shape)  # softcap 0 below; [0] drops the lse
            return FLASH_ATTN(device, q_rows.view(q.shape), rows_k, v, self.scaling, True, *window, 0.0, False)[0]
        # Eager, the host knows the longest sequence: it sizes the decode kernel's splits and lets a chunk onto a
        # non-empty cache run the prefill kernel (0 while compiling: the graph must not depend on lengths).
        longest = 0 if torch.compiler.is_compiling() else max(cache._step_starts, default=0) + seq
        return FLASH_ATTN_WITH_KVCACHE(
            device, q_rows.view(q.shape), key_cache, value_cache, None, None, plan.seq_lens, plan.block_table,
            self.scaling, True, window, max_seqlen_k=longest,
        )  # fmt: skip
