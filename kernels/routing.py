"""Triton fused_topk: one program per BLOCK_T tokens (math and tie rule: qwen_fast/reference/routing.py; the same
candidate packing as csrc/routing.h).

The program loads its tokens' logits as a [BLOCK_T, BLOCK_E] tile (BLOCK_E = next_power_of_2(E), at least 16,
padded with -inf; BLOCK_T = 2048 // BLOCK_E tokens, so 8 candidates per thread at 8 warps). In registers, in fp32:
  scores s     softmax (max, sum of exp(x - max), times 1 / sum) or sigmoid 1 / (1 + exp(-x))
  candidates   int64: the selection score's order key (int32: NaN largest, -0 == +0) << 32 | (2^32 - 1 - expert), so
               the integer maximum is the largest score and, among equal scores, the LOWER expert: ties never depend
               on tl.max internals (tl.argmax does not promise the lower index). Padding: INT64_MIN.
  groups       (G > 1) for each group g (a loop of G): its score = its largest candidate's score, plus (group_top2
               set: "top2_sum") the second largest (the maximum without that one candidate), written as the group's
               candidate into every member's slot; topk_group rounds of "take the largest group candidate" mark the
               kept groups; the experts of the other groups get the candidate of -inf (the reference's masked_fill).
  top-k        k rounds of "take the largest candidate" (one max reduction per token per round): round j stores id j
               and the unbiased score of that expert, recomputed from its logit by the same formula (bit-identical),
               and adds it to an fp32 sum; after a barrier, a second pass divides by the sum (if renormalizing) and
               multiplies by routed_scaling_factor.
Groups and k are loops over one flat tile, not extra tile dimensions, so the compiled configs depend on E alone (7
per dtype). No bitonic sort (tl.sort): for the usual k <= 8 the rounds are a few reductions, and under
TRITON_INTERPRET=1 tl.sort costs about 1 ms per element. Costs: O((G + topk_group + k) * BLOCK_E) per token, slow
only for degenerate cases such as groups of one expert at large E.
"""

import functools
import itertools

import torch
import triton
import triton.language as tl

from .compile_spec import META, CompileSpec, launches

MAX_EXPERTS = 1024  # the tile of candidates stays in registers
MIN_TILE = 16  # smallest BLOCK_E, so that tiny E shares one compiled config
TOKEN_TILE = 2048  # candidates per program: BLOCK_T = TOKEN_TILE // BLOCK_E tokens share a program


@triton.jit
def _candidates(score, expert):
    """int64 candidates: order key of `score` in the high 32 bits, 2^32 - 1 - expert in the low 32."""
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(score != score, 0x7FFFFFFF, key)
    return (key.to(tl.int64) << 32) | (0xFFFFFFFF - expert.to(tl.int64))


@triton.jit
def _candidate_score(candidate):
    key = (candidate >> 32).to(tl.int32)
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _score(x, max_logit, inv_sum, sigmoid):
    if sigmoid != 0:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        s = tl.exp(x - max_logit) * inv_sum
    return s


# The T-dependent int and the routing flags are runtime values (one binary for every batch size and router).
@triton.jit(do_not_specialize=["num_tokens", "sigmoid", "has_bias", "renormalize", "group_top2"])
def _fused_topk_kernel(
    logits, bias, weights, ids, num_tokens, num_experts, group_size, num_groups, topk, topk_group, scale,
    sigmoid, has_bias, renormalize, group_top2, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = tokens < num_tokens  # padding tokens get finite, unused values
    expert = tl.arange(0, BLOCK_E)[None, :]
    valid = live[:, None] & (expert < num_experts)
    x = tl.load(logits + tokens[:, None] * num_experts + expert, mask=valid, other=-float("inf")).to(tl.float32)
    max_logit = tl.where(live, tl.max(x, axis=1), 0.0)  # [BLOCK_T]
    inv_sum = tl.full([BLOCK_T], 1.0, tl.float32)
    if sigmoid == 0:
        exps = tl.where(valid, tl.exp(x - max_logit[:, None]), 0.0)
        inv_sum = 1.0 / tl.where(live, tl.sum(exps, axis=1), 1.0)
    s = _score(x, max_logit[:, None], inv_sum[:, None], sigmoid)
    choice = s
    if has_bias != 0:  # a scalar branch: Triton 3.9's interpreter rejects a scalar condition inside a load mask
        choice = s + tl.load(bias + expert, mask=valid, other=0.0)
    none = tl.full([BLOCK_T, BLOCK_E], -(2**63), tl.int64)
    cand = tl.where(valid, _candidates(choice, expert), none)
    if num_groups > 1:
        group_of = expert // group_size
        group_cand = none  # every expert holds its group's candidate
        for g in range(num_groups):
            member = group_of == g
            top1 = tl.max(tl.where(member, cand, none), axis=1)  # [BLOCK_T]
            top2 = tl.max(tl.where(member & (cand != top1[:, None]), cand, none), axis=1)
            second = tl.where((top2 == -(2**63)) | (group_top2 == 0), 0.0, _candidate_score(top2))
            score = _candidate_score(top1) + second  # a branch here spilled at E = 128 (sm_90)
            group_cand = tl.where(member, _candidates(score, tl.full([BLOCK_T], g, tl.int32))[:, None], group_cand)
        kept = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        for _ in range(topk_group):
            best = tl.max(group_cand, axis=1)[:, None]
            kept = kept | (group_cand == best)
            group_cand = tl.where(group_cand == best, none, group_cand)
        cand = tl.where(valid & ~kept, _candidates(tl.zeros_like(choice) - float("inf"), expert), cand)
    row = logits + tokens * num_experts
    out = tokens * topk
    total = tl.zeros([BLOCK_T], tl.float32)
    for j in range(topk):
        best = tl.max(cand, axis=1)  # [BLOCK_T]
        cand = tl.where(cand == best[:, None], none, cand)
        chosen = tl.where(live, ~best.to(tl.int32), 0)  # the low 32 bits are ~expert
        w = _score(tl.load(row + chosen, mask=live, other=0.0).to(tl.float32), max_logit, inv_sum, sigmoid)
        total += w
        tl.store(ids + out + j, chosen, mask=live)
        tl.store(weights + out + j, w, mask=live)
    tl.debug_barrier()  # the raw weights are visible to every thread of the program
    denominator = tl.where(live & (renormalize != 0), total, 1.0)
    for j in range(topk):
        w = tl.load(weights + out + j, mask=live, other=0.0)
        tl.store(weights + out + j, w / denominator * scale, mask=live)


def _config(num_experts: int) -> dict:
    block_e = max(MIN_TILE, triton.next_power_of_2(num_experts))
    block_t = max(1, TOKEN_TILE // block_e)
    return {"BLOCK_T": block_t, "BLOCK_E": block_e, "num_warps": min(8, block_t * block_e // 256)}


def fused_topk(
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    scoring_func: str,
    e_score_correction_bias: torch.Tensor | None,
    num_expert_group: int | None,
    topk_group: int | None,
    routed_scaling_factor: float,
    group_scoring: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher; arguments as qwen_fast.ops.FUSED_TOPK (checked there; group_scoring "max" or "top2_sum"), outputs
    topk_weights fp32 [T, k] and topk_ids int32 [T, k]."""
    num_tokens, num_experts = gating_output.shape
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"gating_output must have 1 to {MAX_EXPERTS} experts for the Triton kernel, got {num_experts}")
    device = gating_output.device
    weights = torch.empty((num_tokens, topk), dtype=torch.float32, device=device)
    ids = torch.empty((num_tokens, topk), dtype=torch.int32, device=device)
    if num_tokens == 0:
        return weights, ids
    groups = num_expert_group or 1
    kept = topk_group or 1
    bias = weights if e_score_correction_bias is None else e_score_correction_bias.float().contiguous()
    config = _config(num_experts)
    grid = (triton.cdiv(num_tokens, config["BLOCK_T"]),)
    _fused_topk_kernel[grid](
        gating_output.contiguous(), bias, weights, ids, num_tokens, num_experts, num_experts // groups, groups, topk,
        kept, routed_scaling_factor, int(scoring_func == "sigmoid"), int(e_score_correction_bias is not None),
        int(renormalize), int(group_scoring == "top2_sum"), **config,
    )  # fmt: skip
    return weights, ids


def compile_specs() -> list[CompileSpec]:
    """The launches for every BLOCK_E (E = 2^i up to MAX_EXPERTS, and the families' E that are not: 8 (Mixtral), 60
    (Qwen2-MoE)), with softmax top-k (Qwen3-MoE) and with DeepSeek-V3's grouped sigmoid routing (8 groups, 4 kept,
    a bias, scale 2.5), logits in each float dtype."""
    specs = []
    sizes = (8, 60) + tuple(2**i for i in range(MIN_TILE.bit_length() - 1, MAX_EXPERTS.bit_length()))
    for dtype, num_experts, grouped in itertools.product((torch.float32, torch.float16, torch.bfloat16), sizes,
                                                         (False, True)):  # fmt: skip
        if grouped and num_experts < 64:
            continue
        logits = torch.empty(4, num_experts, dtype=dtype, device=META)
        topk = min(8, num_experts)
        if grouped:
            bias = torch.empty(num_experts, dtype=torch.float32, device=META)
            launch = functools.partial(fused_topk, logits, topk, True, "sigmoid", bias, 8, 4, 2.5, "top2_sum")
        else:
            launch = functools.partial(fused_topk, logits, topk, True, "softmax", None, None, None, 1.0, "max")
        specs += launches(launch, f"E={num_experts} k={topk}" + (" grouped sigmoid" if grouped else ""))
    return specs
