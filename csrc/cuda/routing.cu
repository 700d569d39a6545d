// CUDA fused_topk: one warp per token, kWarpsPerBlock tokens per block, no host sync (CUDA-graph safe: the bias
// is converted on the stream, outputs come from the caching allocator). Shared logic and tie rule: ../routing.h.
//
// Lane l owns experts l, l + 32, l + 64, ... (coalesced loads of the logits row). The warp's shared-memory row holds
// E + G int64 candidates (selection score + index, packed so that the integer maximum breaks ties to the lower
// index): at E = 1024, 8 KiB per warp, so the block's rows stay under the default 48 KiB (fewer warps per block when
// E + G is large).
//   1. softmax: warp max of the logits, warp sum of exp(x - max) (each lane's strided partial sum, then a butterfly),
//      then every lane writes the candidates of its experts; sigmoid needs no reduction.
//   2. groups (G > 1): lane g computes group g's score (max or top-2 sum) serially over its E / G candidates (the CPU kernel's
//      function); topk_group rounds of a warp max over the group candidates, lane 0 marking the winner taken; each
//      lane then masks its experts of the groups not taken to the candidate of -inf.
//   3. each lane keeps the best of its own candidates in a register; k rounds of a warp max (5 int64 butterfly
//      steps): the owner of the winner (id % 32) marks it taken and rescans its E / 32 entries, lane j % 32 writes
//      id j and the unbiased score of that expert (recomputed from the logit, bit-identical to step 1).
//   4. the k scores' warp sum; lane j % 32 rewrites weight j renormalized and scaled.
// Step 3 needs no synchronisation: a lane reads and writes only the entries it owns. Offsets are int64 (T * E).
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops.h"
#include "../routing.h"
#include "../routing_checks.h"

namespace qwen_fast {
namespace routing {  // named (not anonymous) so that cuobjdump and profilers print the kernel's name

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;
constexpr int64_t kSharedBudget = 32 * 1024;  // bytes of candidate rows per block

struct TopkArgs {
  const float* bias;  // [E] fp32 or nullptr
  float* weights;     // [T, k]
  int32_t* ids;       // [T, k]
  int64_t num_tokens;
  int num_experts;
  int topk;
  int num_groups;
  int topk_group;
  int warps;  // tokens per block
  bool renormalize;
  bool sigmoid;
  bool group_top2_sum;
  float scale;
};

__device__ __forceinline__ float warp_max(float v) {
  for (int d = kWarp / 2; d > 0; d /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int d = kWarp / 2; d > 0; d /= 2) v += __shfl_xor_sync(kFullMask, v, d);
  return v;
}

__device__ __forceinline__ int64_t warp_max_candidate(int64_t v) {
  for (int d = kWarp / 2; d > 0; d /= 2) {
    v = max_candidate(v, static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(v), d)));
  }
  return v;
}

// The best of the entries lane, lane + 32, ... of row[0, n).
__device__ __forceinline__ int64_t lane_best(const int64_t* row, int n, int lane) {
  int64_t best = kNoCandidate;
  for (int i = lane; i < n; i += kWarp) best = max_candidate(best, row[i]);
  return best;
}

template <typename scalar_t>
__global__ void fused_topk_kernel(const scalar_t* __restrict__ logits, TopkArgs a) {
  extern __shared__ int64_t shared[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * a.warps + warp;
  if (token >= a.num_tokens) return;  // uniform over the warp; no block-wide barrier follows
  const int num_experts = a.num_experts;
  int64_t* candidates = shared + static_cast<int64_t>(warp) * (num_experts + a.num_groups);
  int64_t* group_candidates = candidates + num_experts;
  const scalar_t* x = logits + token * num_experts;

  float max_logit = -INFINITY, inv_sum = 1.0f;
  if (!a.sigmoid) {
    for (int e = lane; e < num_experts; e += kWarp) max_logit = fmaxf(max_logit, static_cast<float>(x[e]));
    max_logit = warp_max(max_logit);
    float sum = 0.0f;
    for (int e = lane; e < num_experts; e += kWarp) sum += softmax_term(static_cast<float>(x[e]), max_logit);
    inv_sum = 1.0f / warp_sum(sum);
  }
  auto score = [&](int e) {
    const float logit = static_cast<float>(x[e]);
    return a.sigmoid ? sigmoid_score(logit) : softmax_score(logit, max_logit, inv_sum);
  };
  for (int e = lane; e < num_experts; e += kWarp) {
    const float s = score(e);
    candidates[e] = make_candidate(a.bias != nullptr ? s + a.bias[e] : s, e);
  }
  __syncwarp();

  if (a.num_groups > 1) {
    const int size = num_experts / a.num_groups;
    for (int g = lane; g < a.num_groups; g += kWarp) {
      group_candidates[g] = make_candidate(group_score(candidates + g * size, size, a.group_top2_sum), g);
    }
    __syncwarp();
    for (int r = 0; r < a.topk_group; ++r) {
      const int64_t best = warp_max_candidate(lane_best(group_candidates, a.num_groups, lane));
      __syncwarp();  // every lane has read the row before lane 0 marks the winner
      if (lane == 0) group_candidates[candidate_index(best)] = kNoCandidate;  // kept
      __syncwarp();
    }
    for (int e = lane; e < num_experts; e += kWarp) {
      if (group_candidates[e / size] != kNoCandidate) candidates[e] = make_candidate(-INFINITY, e);
    }
  }

  int64_t mine = lane_best(candidates, num_experts, lane);
  float* weights = a.weights + token * a.topk;
  int32_t* ids = a.ids + token * a.topk;
  float partial = 0.0f;
  for (int j = 0; j < a.topk; ++j) {
    const int id = candidate_index(warp_max_candidate(mine));
    if (id % kWarp == lane) {
      candidates[id] = kNoCandidate;
      mine = lane_best(candidates, num_experts, lane);
    }
    if (j % kWarp == lane) {
      const float w = score(id);
      ids[j] = id;
      weights[j] = w;
      partial += w;
    }
  }
  const float sum = warp_sum(partial);
  for (int j = lane; j < a.topk; j += kWarp) weights[j] = final_weight(weights[j], a.renormalize, sum, a.scale);
}

}  // namespace routing

std::tuple<at::Tensor, at::Tensor> fused_topk_cuda(const at::Tensor& gating_output, int64_t topk, bool renormalize,
                                                   c10::string_view scoring_func,
                                                   const c10::optional<at::Tensor>& e_score_correction_bias,
                                                   c10::optional<int64_t> num_expert_group,
                                                   c10::optional<int64_t> topk_group, double routed_scaling_factor,
    c10::string_view group_scoring) {
  const RoutingParams p =
      check_fused_topk(gating_output, topk, renormalize, std::string(scoring_func), e_score_correction_bias,
                       num_expert_group, topk_group, routed_scaling_factor, std::string(group_scoring));
  const at::cuda::OptionalCUDAGuard guard(gating_output.device());
  auto [weights, ids] = empty_fused_topk_outputs(gating_output, topk);
  if (p.num_tokens == 0) return {weights, ids};
  const at::Tensor logits = gating_output.contiguous();
  const at::Tensor bias = fp32_bias(e_score_correction_bias);
  const int64_t row_bytes = static_cast<int64_t>(sizeof(int64_t)) * (p.num_experts + p.num_groups);
  const int warps =
      static_cast<int>(std::clamp<int64_t>(routing::kSharedBudget / row_bytes, 1, routing::kWarpsPerBlock));
  routing::TopkArgs args{bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                         weights.mutable_data_ptr<float>(),
                         ids.mutable_data_ptr<int32_t>(),
                         p.num_tokens,
                         static_cast<int>(p.num_experts),
                         static_cast<int>(p.topk),
                         static_cast<int>(p.num_groups),
                         static_cast<int>(p.topk_group),
                         warps,
                         p.renormalize,
                         p.sigmoid,
                         p.group_top2_sum,
                         p.scale};
  const unsigned blocks = static_cast<unsigned>((p.num_tokens + warps - 1) / warps);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(logits.scalar_type(), "fused_topk_cuda", AT_WRAP([&] {
    routing::fused_topk_kernel<scalar_t><<<blocks, warps * routing::kWarp, warps * row_bytes, stream>>>(
        logits.const_data_ptr<scalar_t>(), args);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {weights, ids};
}

TORCH_LIBRARY_IMPL(qwen_fast, CUDA, m) { m.impl("fused_topk", &fused_topk_cuda); }

}  // namespace qwen_fast
