"""Attention over the keys a transformers cache returns, steered by the mask and positions transformers passes.

Used by qwen_fast.nn.GQAAttention (any cache but a PagedKVCache without padding) and by the "qwen_fast" attention
implementation (qwen_fast.integrations.interfaces). q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D] (views of the cache's
[B, Hkv, Sk, D] are fine: the kernels take strides). The queries are the last Sq tokens written, so causal masking
is aligned bottom-right on the written keys. Which keys are written:

- no mask, Sk == Sq (no cache, or a prefill): all of them -> flash_attn_func;
- no mask, Sk > Sq: the first pos_b + 1 of row b, pos_b = position_ids[b, -1] (a DynamicCache holds exactly Sk,
  transformers' StaticCache returns its whole buffer, the unwritten slots last), clamped to [Sq, Sk]
  -> flash_attn_with_kvcache with cache_seqlens = that count;
- a 2D key-padding mask [B, L] (L <= Sk: a static cache's mask may cover the written slots only) or a 4D mask that is
  causal with key padding (checked; anything else is refused) -> the real tokens packed to the front of fixed-size
  buffers by a stable sort and attended with flash_attn_varlen_func, outputs scattered back, padding queries 0.

Every branch depends on shapes and on whether a mask was passed, never on the mask's values: no host sync, and
torch.compile traces each case as one graph. A 4D mask is checked eagerly (ValueError) and with torch._assert_async
while compiling.
"""

import torch

from qwen_fast.ops import FLASH_ATTN, FLASH_ATTN_VARLEN, FLASH_ATTN_WITH_KVCACHE
from qwen_fast.reference.attention import visible_keys


def attend(q, k, v, attention_mask, position_ids, scale: float, causal: bool, window: tuple[int, int]):
    """[B, Sq, Hq, D] attention of q over k/v as the module docstring says; `window` is (left, right) keys."""
    batch, num_q, num_k = q.shape[0], q.shape[1], k.shape[1]
    if attention_mask is None:
        if num_k > num_q and causal and position_ids is not None:
            written = (position_ids[:, -1].to(torch.int32) + 1).clamp(num_q, num_k).expand(batch).contiguous()
            return FLASH_ATTN_WITH_KVCACHE(q.device, q, k, v, None, None, written, None, scale, causal, window)
        return FLASH_ATTN(q.device, q, k, v, scale, causal, *window, 0.0, False)[0]  # no softcap, no lse
    if not causal:
        raise ValueError("qwen_fast attention supports key padding for causal attention only")
    if attention_mask.dim() == 2 and attention_mask.shape[1] < num_k:
        k, v = k[:, : attention_mask.shape[1]], v[:, : attention_mask.shape[1]]  # a static cache's unwritten slots
    return varlen_attention(q, k, v, key_padding(attention_mask, num_q, window[0]), scale, window)


def key_padding(attention_mask: torch.Tensor, num_q: int, window_left: int) -> torch.Tensor:
    """bool [B, S_k] (True = a real token) from transformers' attention mask: a 2D [B, S_k] 0/1 mask, or a 4D
    [B, 1, S_q, S_k] mask (bool: True = attend; float: 0 = attend, a large negative number = masked) that must be
    exactly the causal (windowed) mask of its key padding; anything else raises ValueError. With a window, padding
    must not sit between tokens."""
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
        _require(
            (allowed[:, 0] == expected).all(),
            "qwen_fast attention supports causal attention masks with key padding only; attention_mask differs "
            f"from the causal mask (window_left={window_left}) of its padding",
        )
    else:
        raise ValueError(
            f"attention_mask must be 2D [B, S_k] or 4D [B, 1, S_q, S_k], got {tuple(attention_mask.shape)}"
        )
    if window_left >= 0:
        # Packing the valid tokens preserves window distances only if no padding sits between two of them.
        starts = (keep[:, 1:] & ~keep[:, :-1]).sum(dim=1) + keep[:, 0]
        _require(
            (starts <= 1).all(),
            "qwen_fast attention with a sliding window needs each sequence's tokens contiguous (padding only before "
            "or after them), got padding between tokens",
        )
    return keep


def _require(condition: torch.Tensor, message: str) -> None:
    """ValueError(message) unless `condition` (a bool tensor) holds: checked eagerly, asserted on the device (no
    host sync) while torch.compile traces."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


def varlen_attention(q, k, v, keep, scale: float, window: tuple[int, int]) -> torch.Tensor:
    """Causal attention of the real rows only: q [B, S_q, Hq, D], k/v [B, S_k, Hkv, D], keep bool [B, S_k].

    The queries are the last S_q key slots written: written = 1 + the last slot any row holds a real token in (a
    static cache's tail is unwritten; a right-padded batch has a row without padding). Real queries and keys are
    moved to the front of [B * S, H, D] buffers (stable sort: row-major order kept), rows past the last real one
    belong to no sequence; flash_attn_varlen_func aligns each sequence bottom-right, which is the causal rule over
    the real tokens; outputs go back to their rows and padding queries output 0. Fixed shapes throughout."""
    batch, num_q, num_k = q.shape[0], q.shape[1], k.shape[1]
    device = q.device
    slots = torch.arange(1, num_k + 1, device=device)
    written = torch.where(keep, slots, 0).amax()
    query_slots = written - num_q + torch.arange(num_q, device=device)
    keep_q = keep.gather(1, query_slots.clamp(min=0).expand(batch, num_q)) & (query_slots >= 0)

    def pack(x: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        order = torch.argsort((~real).flatten().to(torch.uint8), stable=True)
        offsets = torch.nn.functional.pad(real.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        return x.flatten(0, 1).index_select(0, order), order, offsets

    rows_q, order_q, cu_q = pack(q, keep_q)
    rows_k, _, cu_k = pack(k, keep)
    rows_v, _, _ = pack(v, keep)
    rows, _ = FLASH_ATTN_VARLEN(
        device, rows_q, rows_k, rows_v, cu_q, cu_k, num_q, num_k, scale, True, *window, 0.0, False
    )
    out = torch.empty_like(rows).index_copy_(0, order_q, rows).view(q.shape)
    return torch.where(keep_q[:, :, None, None], out, 0)
