// CPU fused_topk: one token at a time, parallel over tokens (shared logic and tie rule: ../routing.h).
//   1. scores in fp32 into a per-thread row of E floats: softmax (max; exp(x - max) summed in ascending expert
//      order; times 1 / sum) or sigmoid; selection candidates c[e] = candidate(score + bias, e) in a row of E int64
//   2. groups (num_expert_group G > 1): group score = max or top-2 sum (group_scoring) of each group's E / G
//      candidates; topk_group rounds
//      of "take the largest group"; the experts of the other groups get the candidate of -inf (the reference's
//      masked_fill)
//   3. k rounds of "take the largest candidate" (a linear scan, O(k * E) per token: E <= 1024 keeps a row in L1);
//      round j writes id j and the unbiased score of that expert
//   4. renormalize by the fp32 sum of the k scores (ascending j), times routed_scaling_factor
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../ops.h"
#include "../routing.h"
#include "../routing_checks.h"

namespace qwen_fast {
namespace {

template <typename scalar_t>
void route_token(const scalar_t* x, const float* bias, const RoutingParams& p, float* scores, int64_t* candidates,
                 int64_t* group_candidates, float* weights, int32_t* ids) {
  const int64_t num_experts = p.num_experts;
  if (p.sigmoid) {
    for (int64_t e = 0; e < num_experts; ++e) scores[e] = sigmoid_score(static_cast<float>(x[e]));
  } else {
    float max_logit = -std::numeric_limits<float>::infinity(), sum = 0.0f;
    for (int64_t e = 0; e < num_experts; ++e) max_logit = fmaxf(max_logit, static_cast<float>(x[e]));
    for (int64_t e = 0; e < num_experts; ++e) {
      scores[e] = softmax_term(static_cast<float>(x[e]), max_logit);
      sum += scores[e];
    }
    const float inv_sum = 1.0f / sum;
    for (int64_t e = 0; e < num_experts; ++e) scores[e] = mul_rn(scores[e], inv_sum);  // == softmax_score
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    candidates[e] = make_candidate(bias != nullptr ? scores[e] + bias[e] : scores[e], e);
  }

  if (p.num_groups > 1) {
    const int64_t size = num_experts / p.num_groups;
    for (int64_t g = 0; g < p.num_groups; ++g) {
      group_candidates[g] = make_candidate(group_score(candidates + g * size, size, p.group_top2_sum), g);
    }
    for (int64_t r = 0; r < p.topk_group; ++r) {
      group_candidates[argmax_candidate(group_candidates, p.num_groups)] = kNoCandidate;  // kept
    }
    const float masked = -std::numeric_limits<float>::infinity();
    for (int64_t g = 0; g < p.num_groups; ++g) {
      if (group_candidates[g] == kNoCandidate) continue;
      for (int64_t e = g * size; e < (g + 1) * size; ++e) candidates[e] = make_candidate(masked, e);
    }
  }

  float sum = 0.0f;
  for (int64_t j = 0; j < p.topk; ++j) {
    const int64_t best = argmax_candidate(candidates, num_experts);
    candidates[best] = kNoCandidate;
    ids[j] = static_cast<int32_t>(best);
    weights[j] = scores[best];
    sum += weights[j];
  }
  for (int64_t j = 0; j < p.topk; ++j) weights[j] = final_weight(weights[j], p.renormalize, sum, p.scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_topk_cpu(const at::Tensor& gating_output, int64_t topk, bool renormalize,
                                                  c10::string_view scoring_func,
                                                  const c10::optional<at::Tensor>& e_score_correction_bias,
                                                  c10::optional<int64_t> num_expert_group,
                                                  c10::optional<int64_t> topk_group, double routed_scaling_factor,
    c10::string_view group_scoring) {
  const RoutingParams p =
      check_fused_topk(gating_output, topk, renormalize, std::string(scoring_func), e_score_correction_bias,
                       num_expert_group, topk_group, routed_scaling_factor, std::string(group_scoring));
  auto [weights, ids] = empty_fused_topk_outputs(gating_output, topk);
  const at::Tensor logits = gating_output.contiguous();
  const at::Tensor bias = fp32_bias(e_score_correction_bias);
  const float* bias_ptr = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* weight_ptr = weights.mutable_data_ptr<float>();
  int32_t* id_ptr = ids.mutable_data_ptr<int32_t>();
  AT_DISPATCH_V2(logits.scalar_type(), "fused_topk_cpu", AT_WRAP([&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    // About 16 tokens per task at E = 128 (each token costs O(k * E)): a decode step runs serially.
    const int64_t grain = std::max<int64_t>(1, 2048 / p.num_experts);
    at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(p.num_experts);
      std::vector<int64_t> scratch(p.num_experts + p.num_groups);
      for (int64_t t = begin; t < end; ++t) {
        route_token(x + t * p.num_experts, bias_ptr, p, scores.data(), scratch.data(), scratch.data() + p.num_experts,
                    weight_ptr + t * topk, id_ptr + t * topk);
      }
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {weights, ids};
}

TORCH_LIBRARY_IMPL(qwen_fast, CPU, m) { m.impl("fused_topk", &fused_topk_cpu); }

}  // namespace qwen_fast
