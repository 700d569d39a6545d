// Host-side checks and output allocation of fused_topk, shared by the CPU and CUDA implementations. The Python
// functional API checks first with friendlier messages; these guard direct torch.ops.qwen_fast calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

namespace qwen_fast {

// The largest expert count the kernels take: the CUDA kernel keeps an int64 candidate per expert in shared memory
// (8 KiB per warp at 1024) and the Triton kernel sorts a vector of next_power_of_2(E) candidates in registers.
constexpr int64_t kFusedTopkMaxExperts = 1024;

struct RoutingParams {
  int64_t num_tokens;
  int64_t num_experts;
  int64_t topk;
  bool renormalize;
  bool sigmoid;
  int64_t num_groups;  // 1 without group-limited routing
  int64_t topk_group;  // groups kept (num_groups without group-limited routing)
  float scale;
  bool group_top2_sum;  // group score: the sum of its top-2 ("top2_sum"), else its maximum ("max")
};

inline RoutingParams check_fused_topk(const at::Tensor& gating_output, int64_t topk, bool renormalize,
                                      const std::string& scoring_func,
                                      const c10::optional<at::Tensor>& e_score_correction_bias,
                                      c10::optional<int64_t> num_expert_group, c10::optional<int64_t> topk_group,
                                      double routed_scaling_factor, const std::string& group_scoring) {
  TORCH_CHECK(gating_output.dim() == 2, "fused_topk: gating_output must be [T, E], got ", gating_output.sizes());
  const auto dtype = gating_output.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fused_topk: gating_output must be float32, float16 or bfloat16, got ", dtype);
  const int64_t num_experts = gating_output.size(1);
  TORCH_CHECK(num_experts >= 1 && num_experts <= kFusedTopkMaxExperts, "fused_topk: the kernels take 1 to ",
              kFusedTopkMaxExperts, " experts (gating_output [T, E]), got E = ", num_experts,
              " (the torch backend takes any E)");
  TORCH_CHECK(topk >= 1 && topk <= num_experts, "fused_topk: topk must be in [1, E = ", num_experts, "], got ", topk);
  TORCH_CHECK(scoring_func == "softmax" || scoring_func == "sigmoid",
              "fused_topk: scoring_func must be 'softmax' or 'sigmoid', got '", scoring_func, "'");
  if (e_score_correction_bias.has_value()) {
    const at::Tensor& bias = *e_score_correction_bias;
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == num_experts, "fused_topk: e_score_correction_bias must be [E] = [",
                num_experts, "], got ", bias.sizes());
    TORCH_CHECK(at::isFloatingType(bias.scalar_type()), "fused_topk: e_score_correction_bias must be float, got ",
                bias.scalar_type());
    TORCH_CHECK(bias.device() == gating_output.device(), "fused_topk: e_score_correction_bias must be on ",
                gating_output.device(), " like gating_output, got ", bias.device());
  }
  TORCH_CHECK(num_expert_group.has_value() == topk_group.has_value(),
              "fused_topk: num_expert_group and topk_group go together");
  int64_t groups = 1, kept = 1;
  if (num_expert_group.has_value()) {
    groups = *num_expert_group;
    kept = *topk_group;
    TORCH_CHECK(groups >= 1 && num_experts % groups == 0, "fused_topk: num_expert_group must divide E = ",
                num_experts, ", got ", groups);
    TORCH_CHECK(kept >= 1 && kept <= groups, "fused_topk: topk_group must be in [1, num_expert_group = ", groups,
                "], got ", kept);
    TORCH_CHECK(topk <= kept * (num_experts / groups), "fused_topk: topk = ", topk, " exceeds the ",
                kept * (num_experts / groups), " experts of topk_group = ", kept, " groups");
  }
  TORCH_CHECK(group_scoring == "max" || group_scoring == "top2_sum",
              "fused_topk: group_scoring must be 'max' or 'top2_sum', got '", group_scoring, "'");
  TORCH_CHECK(std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0,
              "fused_topk: routed_scaling_factor must be finite and > 0, got ", routed_scaling_factor);
  return RoutingParams{gating_output.size(0), num_experts, topk, renormalize, scoring_func == "sigmoid", groups,
                       kept, static_cast<float>(routed_scaling_factor), group_scoring == "top2_sum"};
}

// The bias as a contiguous fp32 [E] tensor (an undefined tensor without one): one dtype for the kernels to read.
inline at::Tensor fp32_bias(const c10::optional<at::Tensor>& e_score_correction_bias) {
  if (!e_score_correction_bias.has_value()) return at::Tensor();
  return e_score_correction_bias->to(at::kFloat).contiguous();
}

// topk_weights fp32 [T, k] and topk_ids int32 [T, k] (uninitialised), on gating_output's device.
inline std::tuple<at::Tensor, at::Tensor> empty_fused_topk_outputs(const at::Tensor& gating_output, int64_t topk) {
  const auto options = gating_output.options();
  return {at::empty({gating_output.size(0), topk}, options.dtype(at::kFloat)),
          at::empty({gating_output.size(0), topk}, options.dtype(at::kInt))};
}

}  // namespace qwen_fast
