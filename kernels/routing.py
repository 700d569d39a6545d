"""Triton fused_topk: one program per BLOCK_T tokens (math and tie rule: qwen_fast/reference/routing.py; the same
candidate packing as csrc/routing.h).

The program loads its tokens' logits as a [BLOCK_T, BLOCK_G, BLOCK_S] tile: row g holds group g's E / G experts (one
row of all E experts without groups), padded with -inf to powers of two. In registers, in fp32:
  scores s     softmax (max, sum of exp(x - max), times 1 / sum) or sigmoid 1 / (1 + exp(-x))
  candidates   int64: the selection score's order key (int32: NaN largest, -0 == +0) << 32 | (2^32 - 1 - expert), so
               the integer maximum is the largest score and, among equal scores, the LOWER expert: ties never depend
               on tl.max internals (tl.argmax does not promise the lower index). Padding: INT64_MIN.
  groups       (BLOCK_G > 1) group score = the sum of the row's two largest candidates' scores (its maximum, then
               the maximum without that one candidate); topk_group rounds of "take the largest group candidate"; the
               experts of the other groups get the candidate of -inf (the reference's masked_fill).
  top-k        k rounds of "take the largest candidate" (one max reduction per token per round): round j stores id j
               and the unbiased score of that expert, recomputed from its logit by the same formula (bit-identical),
               and adds it to an fp32 sum; after a barrier, a second pass divides by the sum (if renormalizing) and
               multiplies by routed_scaling_factor.
The k rounds are no bitonic sort (tl.sort) on purpose: for the usual k <= 8 they are a few reductions, and under
TRITON_INTERPRET=1 tl.sort costs about 1 ms per element. Tiles: BLOCK_G * BLOCK_S < 4 * E <= 4096 candidates,
BLOCK_T = max(1, 2048 // (BLOCK_G * BLOCK_S)) tokens per program, 8 candidates per thread.
"""

import torch
import triton
import triton.language as tl

from .compile_spec import TRITON_DTYPE, CompileSpec

MAX_EXPERTS = 1024  # the tile of candidates stays in registers
MIN_TILE = 16  # smallest row of experts, so that tiny E shares one compiled config
TOKEN_TILE = 2048  # candidates per program: BLOCK_T = TOKEN_TILE // tile tokens share a program


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
    if sigmoid:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        s = tl.exp(x - max_logit) * inv_sum
    return s


@triton.jit
def _fused_topk_kernel(
    logits, bias, weights, ids, num_tokens, num_experts, group_size, num_groups, topk, topk_group, scale,
    sigmoid, has_bias, renormalize, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t = tokens[:, None, None]
    g = tl.arange(0, BLOCK_G)[None, :, None]
    s_in_group = tl.arange(0, BLOCK_S)[None, None, :]
    expert = g * group_size + s_in_group  # [1, BLOCK_G, BLOCK_S]
    valid = (t < num_tokens) & (g < num_groups) & (s_in_group < group_size)
    x = tl.load(logits + t * num_experts + expert, mask=valid, other=-float("inf")).to(tl.float32)
    live = tokens < num_tokens  # padding tokens get finite, unused values
    max_logit = tl.where(live, tl.max(tl.max(x, axis=2), axis=1), 0.0)  # [BLOCK_T]
    inv_sum = tl.full([BLOCK_T], 1.0, tl.float32)
    if not sigmoid:
        exps = tl.where(valid, tl.exp(x - max_logit[:, None, None]), 0.0)
        inv_sum = 1.0 / tl.where(live, tl.sum(tl.sum(exps, axis=2), axis=1), 1.0)
    s = _score(x, max_logit[:, None, None], inv_sum[:, None, None], sigmoid)
    choice = s + tl.load(bias + expert, mask=valid & (has_bias != 0), other=0.0)
    none = tl.full([BLOCK_T, BLOCK_G, BLOCK_S], -(2**63), tl.int64)
    cand = tl.where(valid, _candidates(choice, expert), none)
    if BLOCK_G > 1:
        top1 = tl.max(cand, axis=2)  # [BLOCK_T, BLOCK_G]
        top2 = tl.max(tl.where(cand == top1[:, :, None], none, cand), axis=2)
        group_score = _candidate_score(top1) + tl.where(top2 == -(2**63), 0.0, _candidate_score(top2))
        groups = tl.arange(0, BLOCK_G)[None, :]
        group_cand = tl.where(groups < num_groups, _candidates(group_score, groups), -(2**63))
        kept = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int1)
        for _ in range(topk_group):
            best = tl.max(group_cand, axis=1)[:, None]
            kept = kept | (group_cand == best)
            group_cand = tl.where(group_cand == best, -(2**63), group_cand)
        dropped = valid & ~kept[:, :, None]
        cand = tl.where(dropped, _candidates(tl.zeros_like(choice) - float("inf"), expert), cand)
    row = logits + tokens * num_experts
    out = tokens * topk
    total = tl.zeros([BLOCK_T], tl.float32)
    for j in range(topk):
        best = tl.max(tl.max(cand, axis=2), axis=1)  # [BLOCK_T]
        cand = tl.where(cand == best[:, None, None], none, cand)
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


def _config(num_experts: int, num_groups: int) -> dict:
    block_s = triton.next_power_of_2(num_experts // num_groups)
    block_g = triton.next_power_of_2(num_groups)
    if block_g == 1:
        block_s = max(block_s, MIN_TILE)
    tile = block_g * block_s
    block_t = max(1, TOKEN_TILE // tile)
    return {"BLOCK_T": block_t, "BLOCK_G": block_g, "BLOCK_S": block_s, "num_warps": min(8, block_t * tile // 256)}


def fused_topk(
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    scoring_func: str,
    e_score_correction_bias: torch.Tensor | None,
    num_expert_group: int | None,
    topk_group: int | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher; arguments and outputs as qwen_fast.fused_topk (checked there)."""
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
    config = _config(num_experts, groups)
    grid = (triton.cdiv(num_tokens, config["BLOCK_T"]),)
    _fused_topk_kernel[grid](
        gating_output.contiguous(), bias, weights, ids, num_tokens, num_experts, num_experts // groups, groups, topk,
        kept, routed_scaling_factor, int(scoring_func == "sigmoid"), int(e_score_correction_bias is not None),
        int(renormalize), **config,
    )  # fmt: skip
    return weights, ids


def _configs() -> list[dict]:
    """Every config the launcher can pick: all E <= MAX_EXPERTS and all G dividing E."""
    found = {}
    for num_experts in range(1, MAX_EXPERTS + 1):
        for groups in range(1, num_experts + 1):
            if num_experts % groups == 0:
                config = _config(num_experts, groups)
                found[tuple(config.values())] = config
    return [found[key] for key in sorted(found)]


def compile_specs() -> list[CompileSpec]:
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for config in _configs():
            constexprs = {key: config[key] for key in ("BLOCK_T", "BLOCK_G", "BLOCK_S")}
            specs.append(
                CompileSpec(
                    _fused_topk_kernel,
                    {"logits": "*" + TRITON_DTYPE[dtype], "bias": "*fp32", "weights": "*fp32", "ids": "*i32",
                     "num_tokens": "i32", "num_experts": "i32", "group_size": "i32", "num_groups": "i32", "topk": "i32",
                     "topk_group": "i32", "scale": "fp32", "sigmoid": "i32", "has_bias": "i32", "renormalize": "i32",
                     "BLOCK_T": "constexpr", "BLOCK_G": "constexpr", "BLOCK_S": "constexpr"},
                    constexprs,
                    num_warps=config["num_warps"],
                    label=f"fused_topk {TRITON_DTYPE[dtype]} " + "x".join(f"{k[6:]}{v}" for k, v in constexprs.items()),
                )
            )  # fmt: skip
    return specs
