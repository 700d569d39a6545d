"""Reference MoE experts (SwiGLU) and the full routed MoE layer, in transformers 5.x's weight layout.

Weights, read in place (never copied or transposed into new tensors):

    w13 = gate_up_proj [E, 2I, H]     w13[e, :I] is expert e's gate projection, w13[e, I:] its up projection
    w2  = down_proj    [E, H, I]

Each token t is routed to the k experts topk_ids[t, j] with weights topk_weights[t, j]. For each pair (t, j) with
e = topk_ids[t, j] and x = hidden_states[t]:

    gate, up = x @ w13[e, :I].T,  x @ w13[e, I:].T       one GEMM x @ w13[e].T, split in halves   [I]
    act      = silu(gate) * up                                                                       [I]
    y[t, j]  = act @ w2[e].T                                                                         [H]

    out[t]   = sum_{j = 0 .. k-1} float(topk_weights[t, j]) * float(y[t, j])       accumulated in fp32, j ascending
    output   = out.to(hidden_states.dtype)

Numerics. The expert GEMMs and the activation run in the weights' dtype, exactly as transformers' eager experts do
(F.linear with fp32 accumulation inside, one rounding of each GEMM, of silu and of the product to that dtype), so
y[t, j] is what transformers computes. The combine differs on purpose: transformers multiplies y by the weight in the
promoted dtype (bf16 x bf16 for Qwen3, whose router casts the weights to the model dtype; fp32 for Mixtral) and
index_adds into an output of the model dtype, rounding once per expert; this reference multiplies and sums in fp32
and rounds once. The k terms are added in a fixed order (j = 0, 1, ..., k-1) into a zero fp32 accumulator, so the
result is deterministic (no atomics) and fully specified (each term: an fp32 product, then an fp32 add; a kernel
that fuses them into an FMA differs in the last bit, which the fp32 tolerance absorbs).

fused_moe = fused_topk (qwen_fast.reference.routing) followed by fused_experts.
"""

import torch
import torch.nn.functional as F

from qwen_fast.reference.routing import fused_topk


def fused_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Run every token through its k experts (SwiGLU) and sum the weighted outputs (math in the module docstring).

    Args:
        hidden_states: [T, H] float32, float16 or bfloat16.
        w13: [E, 2I, H], the weights' dtype (gate rows first, then up rows: transformers' gate_up_proj).
        w2: [E, H, I], same dtype as w13 (transformers' down_proj).
        topk_weights: [T, k] float32 (as fused_topk returns) or the model dtype (as transformers' Qwen3 router
            returns); used in fp32.
        topk_ids: [T, k] int32 or int64, expert ids in [0, E).

    Returns:
        [T, H] in hidden_states' dtype.

    Example:
        >>> T, H, I, E, k = 3, 8, 4, 4, 2
        >>> x, w13, w2 = torch.randn(T, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I)
        >>> ids = torch.tensor([[0, 3], [3, 1], [1, 0]], dtype=torch.int32)
        >>> fused_experts(x, w13, w2, torch.full((T, k), 0.5), ids).shape
        torch.Size([3, 8])
    """
    num_tokens, topk = topk_ids.shape
    num_experts = w13.shape[0]
    intermediate = w2.shape[2]
    flat_ids = topk_ids.flatten().long()  # pair i = t * k + j

    # y[i] = expert flat_ids[i] applied to token i // k, in the weights' dtype. Every row is written exactly once.
    y = torch.empty(num_tokens * topk, w2.shape[1], dtype=w2.dtype, device=hidden_states.device)
    order = torch.sort(flat_ids, stable=True).indices  # pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        x = hidden_states[pairs // topk].to(w13.dtype)
        gate_up = F.linear(x, w13[expert])  # [count, 2I]
        gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
        act = F.silu(gate) * up
        y[pairs] = F.linear(act, w2[expert])  # [count, H]

    # Weighted sum over the k choices of each token, in fp32, j ascending.
    y = y.view(num_tokens, topk, w2.shape[1])
    weights = topk_weights.float()
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=hidden_states.device)
    for j in range(topk):
        out += weights[:, j, None] * y[:, j].float()
    return out.to(hidden_states.dtype)


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool = True,
    **routing_kwargs,
) -> torch.Tensor:
    """Route with fused_topk, then run fused_experts: a whole routed MoE layer (without shared experts).

    Args:
        hidden_states: [T, H] float32, float16 or bfloat16.
        w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]; both in the weights' dtype.
        gating_output: [T, E] router logits, any float dtype.
        topk: k, experts per token.
        renormalize: divide the k routing weights by their sum.
        **routing_kwargs: scoring_func, e_score_correction_bias, num_expert_group, topk_group,
            routed_scaling_factor, passed to fused_topk.

    Returns:
        [T, H] in hidden_states' dtype. The fp32 weights of fused_topk go straight into the fp32 combine (no cast
        to the model dtype in between, unlike transformers' Qwen3 router).
    """
    topk_weights, topk_ids = fused_topk(gating_output, topk, renormalize, **routing_kwargs)
    return fused_experts(hidden_states, w13, w2, topk_weights, topk_ids)
