// Host-side checks and output allocation of moe_align_block_size, shared by the CPU and CUDA implementations. The
// Python functional API checks first with friendlier messages; these guard direct torch.ops.qwen_fast calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "moe_align.h"

namespace qwen_fast {

// The largest expert count the kernels take: the CUDA kernels keep an int32 per expert in shared memory (a count
// row, the offsets) and the Triton kernels a vector of next_power_of_2(E) int32 in registers.
constexpr int64_t kMoeAlignMaxExperts = 4096;

inline AlignSizes check_moe_align_block_size(const at::Tensor& topk_ids, int64_t block_size, int64_t num_experts) {
  TORCH_CHECK(topk_ids.dim() == 2, "moe_align_block_size: topk_ids must be [T, k], got ", topk_ids.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "moe_align_block_size: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(block_size >= 1, "moe_align_block_size: block_size must be >= 1, got ", block_size);
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMoeAlignMaxExperts,
              "moe_align_block_size: num_experts must be in [1, ", kMoeAlignMaxExperts, "], got ", num_experts);
  const AlignSizes sizes = align_sizes(topk_ids.numel(), num_experts, block_size);
  TORCH_CHECK(sizes.max_num_tokens_padded <= std::numeric_limits<int32_t>::max(),
              "moe_align_block_size: T*k + min(E, T*k) * (block_size - 1) = ", sizes.max_num_tokens_padded,
              " does not fit the int32 sorted_token_ids (T*k = ", topk_ids.numel(), ", block_size = ", block_size,
              ")");
  return sizes;
}

// sorted_token_ids (uninitialised), expert_ids (uninitialised), num_tokens_post_padded (uninitialised), on the
// device of topk_ids.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_moe_align_outputs(const at::Tensor& topk_ids,
                                                                             const AlignSizes& sizes) {
  const auto options = topk_ids.options().dtype(at::kInt);
  return {at::empty({sizes.max_num_tokens_padded}, options), at::empty({sizes.max_num_blocks}, options),
          at::empty({1}, options)};
}

}  // namespace qwen_fast
