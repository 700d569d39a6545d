"""Reference top-k expert routing: softmax (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE) and sigmoid with a selection bias
and group-limited top-k (DeepSeek-V3), as transformers computes them.

For one token with router logits x [E] (in the model dtype; every step below is fp32):

    s      = softmax(x)  or  sigmoid(x)                 scores, computed on x.float() over all E experts
    c      = s + b                                      selection scores; b = e_score_correction_bias, else c = s
    groups (only when num_expert_group G is given): the E experts form G contiguous groups of E / G experts,
           g[i] = c[top1 of group i]                          group_scoring "max" (vLLM, DeepSeek-V2), or
           g[i] = c[top1 of group i] + c[top2 of group i]     group_scoring "top2_sum" (DeepSeek-V3): the largest
                                                              plus the second largest selection score (the top-1
                                                              alone when a group has a single expert)
           The default (group_scoring=None) is vLLM's rule: "top2_sum" with an e_score_correction_bias, "max"
           without one.
           keep the topk_group groups with the largest g, and set c = -inf on every expert of the other groups
    ids    = the k experts with the largest c, in descending order of c
    w      = s[ids]                                     weights come from the UNBIASED scores s
    w      = w / sum(w)                                 if renormalize (fp32 sum of the k weights)
    w      = w * routed_scaling_factor

Ties. Every "largest" above (groups and experts) breaks ties towards the LOWER index, deterministically, so that the
result is a function of the logits alone. torch.topk does not promise this (on CPU, top-5 of 70 equal values returns
ids 46, 48, 47, 49, 45), so the reference uses a stable descending sort. transformers uses torch.topk, so it agrees
with this reference whenever there is no tie at the selection boundary.

What transformers does with these weights (kept out of this function, which always returns fp32):
- Qwen3-MoE, Qwen2-MoE, OLMoE: logits in the model dtype, softmax in fp32, top-k, renormalize iff norm_topk_prob, then
  cast the weights to the model dtype.
- Mixtral: softmax in fp32, top-k, always renormalize, weights stay fp32.
- DeepSeek-V3: logits computed in fp32 (hidden states and router weight upcast), sigmoid, the fp32
  e_score_correction_bias buffer always added (zeros when untrained, so vLLM's rule picks the top-2 sum, as
  DeepSeek-V3 does), group-limited top-k, renormalize iff norm_topk_prob with a denominator of sum + 1e-20 (the same
  fp32 number as the sum whenever the sum exceeds ~1e-12; this reference divides by the plain sum), then
  x routed_scaling_factor whether or not it renormalized. Its top-k is unsorted (sorted=False), so its ids come in
  no particular order; this reference returns them in descending order of selection score.
"""

import torch

GROUP_SCORINGS = ("max", "top2_sum")


def resolve_group_scoring(group_scoring: str | None, e_score_correction_bias: torch.Tensor | None) -> str:
    """vLLM's rule for None: "top2_sum" with a correction bias (DeepSeek-V3), "max" without (DeepSeek-V2)."""
    if group_scoring is not None:
        return group_scoring
    return "max" if e_score_correction_bias is None else "top2_sum"


def token_expert_indices(num_tokens: int, topk: int, device: torch.device) -> torch.Tensor:
    """vLLM's third output of fused_topk: int32 [T, k] with [t, j] = j * T + t (the row of pair (t, j) in a
    choice-major [k * T] layout, as vLLM's topk_softmax kernel writes it)."""
    return torch.arange(topk * num_tokens, dtype=torch.int32, device=device).view(topk, num_tokens).t().contiguous()


def _argsort_desc(x: torch.Tensor) -> torch.Tensor:
    """int64 indices sorting `x` descending along the last dim; equal values keep ascending index order."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices


def topk_routing(
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool = True,
    *,
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    group_scoring: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `topk` experts per token from router logits and weigh them (see the module docstring for the math): the
    routing itself, returning (topk_weights, topk_ids); fused_topk wraps it in vLLM's signature.

    Args:
        gating_output: [T, E] float32, float16 or bfloat16. Router logits, one row per token.
        topk: k, the number of experts per token, 1 <= k <= E.
        renormalize: divide the k weights by their fp32 sum (Qwen3 norm_topk_prob, always for Mixtral).
        scoring_func: "softmax" (over all E experts) or "sigmoid" (elementwise), both in fp32.
        e_score_correction_bias: [E], any float dtype (used in fp32), or None. Added to the scores for the choice of
            experts only; the returned weights are the unbiased scores (DeepSeek-V3).
        num_expert_group: G, or None for a plain top-k. E must be a multiple of G.
        topk_group: the number of groups kept when num_expert_group is given (defaults to G: every group kept).
        routed_scaling_factor: multiplies the final weights (DeepSeek-V3: 2.5).
        group_scoring: "max", "top2_sum", or None for vLLM's rule (see the module docstring).

    Returns:
        topk_weights: [T, k] float32, in the order of topk_ids.
        topk_ids: [T, k] int32, in descending order of selection score, ties to the lower expert index.

    Example:
        >>> logits = torch.tensor([[1.0, 3.0, 2.0, 3.0]])
        >>> w, ids = topk_routing(logits, 2)
        >>> ids.tolist(), [round(v, 4) for v in w[0].tolist()]
        ([[1, 3]], [0.5, 0.5])
    """
    logits = gating_output.float()
    if scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring_func == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")

    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()

    if num_expert_group is not None:
        num_tokens, num_experts = choice.shape
        group_size = num_experts // num_expert_group
        keep = num_expert_group if topk_group is None else topk_group
        grouped = choice.view(num_tokens, num_expert_group, group_size)
        if resolve_group_scoring(group_scoring, e_score_correction_bias) == "max":
            group_scores = grouped.max(dim=-1).values  # [T, G]
        else:  # the sum of the two largest selection scores of each group (fp32, largest + second largest)
            group_scores = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(dim=-1)
        kept_groups = _argsort_desc(group_scores)[:, :keep]  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        expert_mask = group_mask.repeat_interleave(group_size, dim=1)  # [T, E]
        choice = choice.masked_fill(~expert_mask, float("-inf"))

    topk_ids = _argsort_desc(choice)[:, :topk]  # [T, k] int64
    topk_weights = scores.gather(1, topk_ids)  # [T, k] fp32, unbiased
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)


def fused_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool = True,
    indices_type: torch.dtype | None = None,
    **routing_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's fused_topk: topk_routing of `gating_output` [T, E] (`hidden_states` [T, H] only gives T), the ids as
    `indices_type` (int32 when None), and token_expert_indices int32 [T, k] ([t, j] = j * T + t).
    routing_kwargs: topk_routing's keyword arguments.

    Example:
        >>> w, ids, rows = fused_topk(torch.zeros(2, 8), torch.tensor([[1.0, 3.0, 2.0], [0.0, 1.0, 2.0]]), 2)
        >>> ids.tolist(), rows.tolist()
        ([[1, 2], [2, 1]], [[0, 2], [1, 3]])
    """
    weights, ids = topk_routing(gating_output, topk, renormalize, **routing_kwargs)
    ids = ids if indices_type is None else ids.to(indices_type)
    return weights, ids, token_expert_indices(gating_output.shape[0], topk, gating_output.device)
