"""Reference top-k expert routing: softmax (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE) and sigmoid with a selection bias
and group-limited top-k (DeepSeek-V3), as transformers computes them.

For one token with router logits x [E] (in the model dtype; every step below is fp32):

    s      = softmax(x)  or  sigmoid(x)                 scores, computed on x.float() over all E experts
    c      = s + b                                      selection scores; b = e_score_correction_bias, else c = s
    groups (only when num_expert_group G is given): the E experts form G contiguous groups of E / G experts,
           g[i] = c[top1 of group i] + c[top2 of group i]   (the largest plus the second largest: the sum of the top-2
                                                             selection scores; the top-1 alone when a group has a
                                                             single expert)
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
  e_score_correction_bias buffer always added (zeros when untrained, so the group score is the top-2 sum even
  "without" a bias), group-limited top-k, renormalize iff norm_topk_prob with a denominator of sum + 1e-20 (the same
  fp32 number as the sum whenever the sum exceeds ~1e-12; this reference divides by the plain sum), then
  x routed_scaling_factor whether or not it renormalized. Its top-k is unsorted (sorted=False), so its ids come in
  no particular order; this reference returns them in descending order of selection score.
"""

import torch


def _argsort_desc(x: torch.Tensor) -> torch.Tensor:
    """int64 indices sorting `x` descending along the last dim; equal values keep ascending index order."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices


def fused_topk(
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool = True,
    *,
    scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `topk` experts per token from router logits and weigh them (see the module docstring for the math).

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

    Returns:
        topk_weights: [T, k] float32, in the order of topk_ids.
        topk_ids: [T, k] int32, in descending order of selection score, ties to the lower expert index.

    Example:
        >>> logits = torch.tensor([[1.0, 3.0, 2.0, 3.0]])
        >>> w, ids = fused_topk(logits, 2)
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
        # Sum of the two largest selection scores of each group (fp32, largest + second largest).
        top2 = torch.sort(grouped, dim=-1, descending=True).values[..., :2]
        group_scores = top2.sum(dim=-1)  # [T, G]
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
