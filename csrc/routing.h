// Logic of fused_topk shared by the CPU and CUDA implementations (contract: qwen_fast/reference/routing.py).
//
// Every "largest" of the routing (experts and groups) is the maximum of a candidate: one int64 that packs the
// selection score's total order in the high 32 bits and (2^32 - 1 - index) in the low 32 bits, so the plain integer
// maximum picks the largest score and, among equal scores, the LOWER index (the reference's stable descending sort).
// The order is torch.sort's: NaN above +inf (all NaNs equal), -0 equal to +0. A taken or absent entry is
// kNoCandidate, below every candidate. Candidates of distinct indices are distinct, so k rounds of "take the
// maximum" give the top-k in descending order with no tie left to chance; the CPU kernel runs the rounds serially,
// the CUDA kernel as warp reductions, the Triton kernel as one bitonic sort of the candidates.
//
// Scores are computed as torch's CPU kernels write them, in fp32: softmax = exp(x - max) * (1 / sum) (the sum is
// over exp(x - max); its order, and the exp implementation, are each backend's own, so a score may differ from the
// reference in the last bit), sigmoid = 1 / (1 + exp(-x)); the selection score adds the fp32 bias.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace qwen_fast {

constexpr int64_t kNoCandidate = INT64_MIN;

// a * b rounded once (nvcc would otherwise contract a later `+ bias` into an fma: another rounding than torch's).
QF_HOST_DEVICE float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// exp(x - max): a term of the softmax sum, and the score once multiplied by 1 / sum.
QF_HOST_DEVICE float softmax_term(float logit, float max_logit) { return expf(logit - max_logit); }

QF_HOST_DEVICE float softmax_score(float logit, float max_logit, float inv_sum) {
  return mul_rn(softmax_term(logit, max_logit), inv_sum);
}

QF_HOST_DEVICE float sigmoid_score(float logit) { return 1.0f / (1.0f + expf(-logit)); }

// The score's rank as an int32: monotonic in the float order, NaN largest, -0 == +0.
QF_HOST_DEVICE int32_t score_key(float score) {
  if (score != score) return INT32_MAX;
  if (score == 0.0f) score = 0.0f;
  int32_t bits;
#ifdef __CUDA_ARCH__
  bits = __float_as_int(score);
#else
  std::memcpy(&bits, &score, sizeof(bits));
#endif
  return bits >= 0 ? bits : bits ^ INT32_MAX;  // negative floats: larger magnitude, smaller key
}

// The score a key came from (a NaN for the NaN key).
QF_HOST_DEVICE float key_score(int32_t key) {
  const int32_t bits = key >= 0 ? key : key ^ INT32_MAX;
  float score;
#ifdef __CUDA_ARCH__
  score = __int_as_float(bits);
#else
  std::memcpy(&score, &bits, sizeof(score));
#endif
  return score;
}

QF_HOST_DEVICE int64_t make_candidate(float score, int64_t index) {
  const uint32_t low = 0xffffffffu - static_cast<uint32_t>(index);
  return static_cast<int64_t>(static_cast<uint64_t>(static_cast<uint32_t>(score_key(score))) << 32 | low);
}

QF_HOST_DEVICE int32_t candidate_index(int64_t candidate) {
  return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(candidate & 0xffffffff));
}

QF_HOST_DEVICE float candidate_score(int64_t candidate) {
  return key_score(static_cast<int32_t>(candidate >> 32));
}

QF_HOST_DEVICE int64_t max_candidate(int64_t a, int64_t b) { return a > b ? a : b; }

// Index of the largest of candidates[0, n) (kNoCandidate entries never win; n >= 1 and one entry is a candidate).
QF_HOST_DEVICE int64_t argmax_candidate(const int64_t* candidates, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (candidates[i] > candidates[best]) best = i;
  }
  return best;
}

// A group's score from its `size` candidates: the largest selection score ("max": vLLM and DeepSeek-V2 without a
// correction bias), or the sum of its two largest ("top2_sum": DeepSeek-V3, vLLM with a bias; the largest alone for a
// group of one), as the reference's fp32 max or top-2 sum.
QF_HOST_DEVICE float group_score(const int64_t* candidates, int64_t size, bool top2_sum) {
  int64_t first = kNoCandidate, second = kNoCandidate;
  for (int64_t i = 0; i < size; ++i) {
    const int64_t c = candidates[i];
    if (c > first) {
      second = first;
      first = c;
    } else if (c > second) {
      second = c;
    }
  }
  const float top = candidate_score(first);
  return (!top2_sum || second == kNoCandidate) ? top : top + candidate_score(second);
}

// The final weight of a picked expert: its unbiased score, / the fp32 sum of the k scores if renormalizing, then
// x routed_scaling_factor (two roundings, as the reference).
QF_HOST_DEVICE float final_weight(float score, bool renormalize, float sum, float scale) {
  return (renormalize ? score / sum : score) * scale;
}

}  // namespace qwen_fast
