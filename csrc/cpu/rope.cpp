// CPU rotary_embedding and qk_norm_rope_and_cache: parallel over tokens; one worker takes a token's Hq + Hkv head rows
// in order (sum of squares, then norm + rope + writes in one sweep of the row) and its value rows. Per-row logic and
// roundings: ../rope.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../ops.h"
#include "../rope_checks.h"

namespace qwen_fast {
namespace {

// Positions in [0, max_position) and slots below the caches' capacity: out-of-range indices would read or write
// outside the tensors. Both are read through their strides, as the kernels read them.
void check_ranges(const char* op, const at::Tensor& positions, int64_t max_position, const at::Tensor* slots,
                  int64_t capacity) {
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.size(0); ++t) {
    const int64_t p = pos[t * positions.stride(0)];
    TORCH_CHECK(p >= 0 && p < max_position, op, ": positions[", t, "] = ", p, " is outside the cos_sin_cache's [0, ",
                max_position, ")");
  }
  if (slots == nullptr) return;
  const int64_t* slot = slots->const_data_ptr<int64_t>();
  for (int64_t t = 0; t < slots->size(0); ++t) {
    const int64_t s = slot[t * slots->stride(0)];
    TORCH_CHECK(s < capacity, op, ": slot_mapping[", t, "] = ", s, " is past the caches' ", capacity, " slots");
  }
}

// The launch for with_rope_args: tokens split over the threads, each token's rows done in order.
struct CpuLaunch {
  const RopeLayout& layout;
  int64_t num_tokens;

  template <typename Scalar, typename Cache>
  void operator()(const RopeArgs<Scalar, Cache>& args) const {
    const int64_t heads = layout.num_q_heads + layout.num_kv_heads;
    at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Cache* cos = cos_sin_row(args, layout, t);
        for (int64_t h = 0; h < heads; ++h) {
          const HeadRow<Scalar> row = head_row(args, layout, t, h);
          const float sum = row.weight == nullptr ? 0.0f : partial_sum_squares(row.x, layout.head_dim, 0, 1);
          process_row(row, cos, sum, layout, 0, 1);
          copy_rows_to_cache(row, layout, 0, 1);
        }
      }
    });
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cpu(const at::Tensor& positions, const at::Tensor& query,
                                                        const at::Tensor& key, const at::Tensor& cos_sin_cache,
                                                        bool is_neox) {
  const RopeLayout layout = check_rotary("rotary_embedding", positions, query, key, cos_sin_cache, is_neox);
  check_ranges("rotary_embedding", positions, cos_sin_cache.size(0), nullptr, 0);
  return with_rope_args(positions, query, key, cos_sin_cache, RopeExtras{}, CpuLaunch{layout, query.size(0)});
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_and_cache_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& q_norm_weight,
    const at::Tensor& k_norm_weight, double eps, const at::Tensor& positions, const at::Tensor& cos_sin_cache,
    at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping, bool is_neox) {
  const RopeLayout layout = check_qk_norm_rope_and_cache(query, key, value, q_norm_weight, k_norm_weight, eps,
                                                         positions, cos_sin_cache, key_cache, value_cache,
                                                         slot_mapping, is_neox);
  check_ranges("qk_norm_rope_and_cache", positions, cos_sin_cache.size(0), &slot_mapping,
               key_cache.size(0) * layout.block_size);
  const RopeExtras extras{&value, &q_norm_weight, &k_norm_weight, &key_cache, &value_cache, &slot_mapping};
  return with_rope_args(positions, query, key, cos_sin_cache, extras, CpuLaunch{layout, query.size(0)});
}

TORCH_LIBRARY_IMPL(qwen_fast, CPU, m) {
  m.impl("rotary_embedding", &rotary_embedding_cpu);
  m.impl("qk_norm_rope_and_cache", &qk_norm_rope_and_cache_cpu);
}

}  // namespace qwen_fast
