"""qwen_fast as a transformers 5.x experts and attention implementation.

`register()` (also `qwen_fast.register_transformers()`) adds "qwen_fast" to transformers' ExpertsInterface,
FP8ExpertsInterface, AttentionInterface and AttentionMaskInterface. Afterwards

    model = AutoModelForCausalLM.from_pretrained(
        path, experts_implementation="qwen_fast", attn_implementation="qwen_fast"
    )
    model.set_experts_implementation("qwen_fast")  # or switch a loaded model, and back
    model.set_attn_implementation("qwen_fast")

run the model's experts (every class decorated with transformers' @use_experts_implementation whose layout is the SwiGLU
gate_up_proj [E, 2I, H] / down_proj [E, H, I] one: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3, ...) through
qwen_fast.fused_experts, and its attention through qwen_fast.flash_attn_func / flash_attn_varlen_func, each on the
backend qwen_fast picks per call (`qwen_fast.use_backend`). A model loaded from an FP8 checkpoint (its experts are
transformers' FP8Experts: fp8 weights with 128 x 128 block scales) runs them through fused_experts' use_fp8_w8a8 path,
with the activations in the model dtype (w8a16), wherever the FP8Experts are (transformers itself has no CPU kernel for
them, and on a machine without a GPU it dequantizes an FP8 checkpoint to bf16 at load: there
`qwen_fast.quantize_experts(model, "fp8")` makes 8-bit experts again). Routing, RoPE, the cache and the projections stay
the model's own. To write and read a paged KV cache in place, swap the modules instead (qwen_fast.nn).

Registering is explicit: importing qwen_fast does not import transformers; this module does.
"""

import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.activations import SiLUActivation
from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

from qwen_fast.nn import _hf
from qwen_fast.nn.cached_attention import attend
from qwen_fast.ops import flash_attn_varlen_func, fused_experts

from .continuous_batching import allow_qwen_fast

# The layout flags transformers' @use_experts_implementation sets on an experts module, and the value fused_experts
# needs: gate and up rows concatenated in gate_up_proj [E, 2I, H], down_proj [E, H, I], no bias, no post-expert
# norm.
_LAYOUT = {
    "has_gate": True,
    "is_concatenated": True,
    "is_transposed": False,
    "has_bias": False,
    "has_post_expert_norm": False,
}


@functools.cache
def _other_ranks_map(num_local: int, device: torch.device) -> torch.Tensor:
    """fused_experts' expert_map for transformers' expert parallelism: local ids to themselves, and the id
    num_local, which transformers gives the routes owned by another rank (all-reduce EP), to -1 (no work, 0)."""
    expert_map = torch.arange(num_local + 1, dtype=torch.int32, device=device)
    expert_map[num_local] = -1
    return expert_map


def _check_experts(module: nn.Module) -> None:
    """ValueError naming `module`'s class and the first layout flag (or activation) fused_experts cannot run."""
    cls = type(module).__name__
    for flag, needed in _LAYOUT.items():
        if getattr(module, flag, needed) != needed:
            raise ValueError(
                f"qwen_fast experts need {flag}={needed}; {cls} has {flag}={getattr(module, flag)!r}. "
                "Use another experts_implementation for this model"
            )
    if type(module)._apply_gate is not _default_apply_gate:
        raise ValueError(
            f"qwen_fast experts compute silu(gate) * up; {cls} overrides _apply_gate. "
            "Use another experts_implementation for this model"
        )
    act_fn = getattr(module, "act_fn", None)
    if not isinstance(act_fn, (nn.SiLU, SiLUActivation)):
        raise ValueError(
            f"qwen_fast experts compute SwiGLU (act_fn SiLU); {cls} has act_fn={type(act_fn).__name__}. "
            "Use another experts_implementation for this model"
        )


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts forward, run by qwen_fast.fused_experts on the module's weights in place.

    Args:
        self: a transformers experts module: gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj
            [E, H, I] in the model dtype, the layout flags of @use_experts_implementation, act_fn SiLU.
        hidden_states: [T, H], the weights' dtype.
        top_k_index: [T, k] int64 (or int32) expert ids in [0, E); under transformers' expert parallelism (the
            module's _is_expert_parallel) E is this rank's expert count and the id E marks a route to another
            rank's expert (weight 0), which costs no work here.
        top_k_weights: [T, k] fp32 or the model dtype.

    Returns:
        [T, H] in hidden_states' dtype: sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(x_t), accumulated in
        fp32.

    Raises:
        ValueError: a layout fused_experts does not compute (the message names the class and the flag).
    """
    _check_experts(self)
    return _run(self, hidden_states, top_k_index, top_k_weights, {})


def fp8_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' FP8 experts forward (FP8ExpertsInterface), run by qwen_fast.fused_experts with use_fp8_w8a8 on
    the module's fp8 weights and block scales in place; activations stay in hidden_states' dtype.

    Args:
        self: transformers' FP8Experts: gate_up_proj [E, 2I, H] and down_proj [E, H, I] float8_e4m3fn,
            gate_up_proj_scale_inv and down_proj_scale_inv fp32 per block_size (bn, bk) block, dynamic activations.
        hidden_states, top_k_index, top_k_weights: as experts_forward.

    Returns:
        [T, H] in hidden_states' dtype.

    Raises:
        ValueError: a format qwen_fast does not run (FP4 weights, UE8M0 or per-tensor scales, static activation
            scales, another activation): the message names it.
    """
    w13_scale, w2_scale, block_shape = _hf.fp8_experts_scales(self)
    quant = {"use_fp8_w8a8": True, "w1_scale": w13_scale, "w2_scale": w2_scale, "block_shape": block_shape}
    return _run(self, hidden_states, top_k_index, top_k_weights, quant)


def _run(module: nn.Module, hidden_states, top_k_index, top_k_weights, options: dict) -> torch.Tensor:
    """fused_experts on `module`'s weights; under transformers' expert parallelism with the map that drops the
    routes to other ranks' experts."""
    if getattr(module, "_is_expert_parallel", False):
        # transformers' expert parallelism runs this rank's experts (local shards, local ids); routes it sends here
        # for other ranks' experts carry the id num_local with weight 0: the map makes them cost nothing
        options = options | {"expert_map": _other_ranks_map(module.gate_up_proj.shape[0], hidden_states.device)}
    return fused_experts(hidden_states, module.gate_up_proj, module.down_proj, top_k_weights, top_k_index, **options)


def _packed_cu_seqlens(position_ids: torch.Tensor | None, batch: int, seq: int) -> tuple[torch.Tensor, int] | None:
    """(int32 [N + 1] offsets on position_ids' device, the longest sequence) of the sequences packed in one row
    (batch 1, positions that restart), else None.

    A sequence starts wherever the position does not follow the previous one (transformers' rule for packed
    sequences, find_packed_sequence_indices). Read on the host: one copy of the positions (the one sync that finding
    the starts needs anyway), which also gives the exact longest sequence for the kernel's grid.
    """
    if position_ids is None or tuple(position_ids.shape) != (1, seq) or batch != 1 or seq < 2:
        return None
    positions = position_ids.reshape(-1).cpu()
    starts = torch.nonzero(positions.diff() != 1).reshape(-1) + 1
    if starts.numel() == 0:
        return None
    cu = torch.cat((torch.zeros(1, dtype=starts.dtype), starts, torch.tensor([seq]))).to(torch.int32)
    return cu.to(position_ids.device), int(cu.diff().max())


def _max_length(value: object, total: int) -> int:
    """A bound on the longest packed sequence: transformers' max_length_q/k keyword (a host int, or continuous
    batching's per-layer-type dict of them: their maximum), at most `total` tokens; `total` when absent or a tensor
    (reading it would cost a host sync)."""
    if isinstance(value, dict):
        value = max(value.values(), default=None)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, total)
    return total


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function contract, run by qwen_fast's flash attention (GQA without repeating K/V).

    Args:
        module: the calling attention module (is_causal, read unless kwargs has is_causal).
        query: [B, Hq, S, D]; key, value: [B, Hkv, Sk, D] (Hq a multiple of Hkv), query's dtype.
        attention_mask: from the mask function registered with it (attention_mask_function): None, or
            the key padding [B, L] (True = a real token, L <= Sk: a static cache's keys past L are unwritten);
            a user's 4D [B, 1, S, Sk] mask must be causal (windowed) with key padding.
        scaling: softmax scale, default D ** -0.5.
        dropout: must be 0 (transformers passes attention_dropout in training): refused otherwise.
        sliding_window: keys per query, the query's own included (None: all).
        kwargs: is_causal; position_ids (batch 1, restarting positions: packed sequences) or cu_seq_lens_q /
            cu_seq_lens_k (padding-free batches, with max_length_q / max_length_k: host ints, or continuous
            batching's dict of them per layer type), both run through flash_attn_varlen_func.

    Returns:
        ([B, S, Hq, D] in query's dtype, None). Query rows that are padding output 0.
    """
    cls = type(module).__name__
    if dropout:
        raise ValueError(
            f"qwen_fast attention has no dropout; {cls} asked for dropout={dropout} (training with "
            "attention_dropout > 0): set config.attention_dropout = 0 or use another attn_implementation"
        )
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"qwen_fast attention does not support {name}; {cls} passed {name}={kwargs[name]!r}")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D] views: flash-attn's layout
    scale = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    # A window of w keys: w - 1 to the left (and, not causal, to the right: transformers' flash attention; its sdpa
    # masks |i - j| <= w there, one key more on each side).
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0 if causal else sliding_window - 1)
    options = {"softmax_scale": scale, "causal": causal, "window_size": window}

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    rows_q, rows_k = q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:])
    # max_seqlen_q/k size the kernel's grid: transformers' host ints max_length_q/k where it passes them (its flash
    # path's contract: data collators, continuous batching; not with its block table, where they are a constant 1),
    # else the token counts; for sequences recovered from position_ids, their exact longest.
    trusted = kwargs.get("block_table") is None
    max_q = _max_length(kwargs.get("max_length_q") if trusted else None, rows_q.shape[0])
    max_k = _max_length(kwargs.get("max_length_k") if trusted else None, rows_k.shape[0])
    if attention_mask is None and cu_q is None:
        packed = _packed_cu_seqlens(kwargs.get("position_ids"), q.shape[0], q.shape[1])
        if packed is not None:
            (cu_q, max_q), (cu_k, max_k) = packed, packed
    if attention_mask is None and cu_q is not None:
        # Sequences packed along the rows: flash_attn_varlen_func on the flattened tokens.
        out = flash_attn_varlen_func(
            rows_q, rows_k, v.reshape(-1, *v.shape[2:]), cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
            **options,
        )  # fmt: skip
        return out.view(q.shape), None

    return attend(q, k, v, attention_mask, kwargs.get("position_ids"), scale, causal, window), None


def attention_mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The key padding qwen_fast's attention reads: None when nothing is padded, else bool [B, kv_length].

    As transformers' flash_attention_mask (the last kv_length columns of the 2D mask; None when all are real), except
    that a mask shorter than kv_length (a static cache returns its whole buffer, the unwritten slots last) is padded
    with False to kv_length, so a compiled decode step sees one shape every step; and while torch.compile traces, a
    full-length mask is returned as it is (no data-dependent `all()`: the attention handles a mask without padding).
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].bool()
    if mask.shape[1] < kv_length:
        return torch.nn.functional.pad(mask, (0, kv_length - mask.shape[1]), value=False)
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask


def register(name: str = "qwen_fast") -> str:
    """Register qwen_fast with transformers as `name` (experts, FP8 experts, attention and attention-mask
    implementation).

    Idempotent. Returns `name`, for `from_pretrained(..., experts_implementation=name, attn_implementation=name)`.

    >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    >>> model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
    ...     vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2))
    >>> name = qwen_fast.register_transformers()
    >>> model.set_experts_implementation(name); model.set_attn_implementation(name)
    >>> with torch.no_grad(), qwen_fast.record_backends() as calls:
    ...     logits = model(torch.tensor([[1, 2, 3]])).logits
    >>> sorted({op for op, _ in calls})
    ['flash_attn_func', 'fused_experts']

    Raises:
        ValueError: `name` is empty, contains "flash" or "/" (transformers would fetch it as a Hub kernel), or is
            already registered for something else.
    """
    if not isinstance(name, str) or not name or "flash" in name or "/" in name:
        raise ValueError(
            f'name must be a non-empty string without "flash" or "/" (transformers loads those from the Hub), '
            f"got {name!r}"
        )
    # Padding reaches the attention function only if the mask interface knows the name (else transformers passes
    # no mask at all). flash_attention_mask, not sdpa_mask: qwen_fast runs a padded batch by packing its real tokens
    # (flash_attn_varlen_func), which needs only the [B, Sk] key padding: O(B * Sk) instead of sdpa's [B, 1, S, Sk]
    # boolean mask, and nothing to check per layer. Like transformers' flash attention, it drops mask overlays
    # (or/and mask functions, e.g. bidirectional image tokens), which the MoE decoders served here do not use;
    # packed sequences are recovered from position_ids, as flash attention does.
    entries: list[tuple[type, Callable]] = [
        (ExpertsInterface, experts_forward),
        (FP8ExpertsInterface, fp8_experts_forward),
        (AttentionInterface, attention_forward),
        (AttentionMaskInterface, attention_mask_function),
    ]
    for interface, function in entries:
        current = interface().get(name)
        if current is not None and current is not function:
            raise ValueError(
                f"name {name!r} is already registered in transformers' {interface.__name__} as "
                f"{getattr(current, '__qualname__', current)!r}; pick another name"
            )
    for interface, function in entries:
        interface.register(name, function)
    allow_qwen_fast(name)
    return name
