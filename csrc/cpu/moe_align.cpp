// CPU moe_align_block_size: a counting sort over tiles of kCpuTile flat ids (shared logic: ../moe_align.h).
//   1. parallel over tiles: counts[r][e] = ids of tile r routed to expert e (one private row per tile, no atomics)
//   2. offsets[e] = exclusive prefix of the padded totals; columns of counts become the tiles' write bases
//   3. parallel over tiles: each tile writes its ids in ascending flat index at base[r][e]++ (disjoint positions)
//   4. parallel over blocks: expert_ids[b] by binary search of the offsets
// kCpuTile = 16384 ids (64 KiB of int32 ids) keeps a tile's ids and its count row in L2 and makes the count matrix
// (rows x E int32) small next to the ids; a decode step (N = T*k <= 16384) is one tile and runs serially.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../moe_align_checks.h"
#include "../ops.h"

namespace qwen_fast {
namespace {

constexpr int64_t kCpuTile = 16384;

template <typename Id>
void moe_align_cpu_impl(const Id* ids, const AlignSizes& sizes, int64_t block_size, int64_t num_experts,
                        int32_t* sorted, int32_t* expert_ids, int32_t* post_padded) {
  const int64_t n = sizes.num_pairs;
  const int64_t rows = std::max<int64_t>(1, (n + kCpuTile - 1) / kCpuTile);
  std::vector<int32_t> counts(rows * num_experts, 0);
  std::vector<int64_t> first_bad(rows, -1);
  at::parallel_for(0, rows, 1, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      int32_t* row = counts.data() + r * num_experts;
      for (int64_t i = tile_begin(r, kCpuTile, n); i < tile_end(r, kCpuTile, n); ++i) {
        const int64_t e = static_cast<int64_t>(ids[i]);
        if (!is_expert(e, num_experts)) {
          first_bad[r] = i;
          break;
        }
        ++row[e];
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = first_bad[r];
    TORCH_CHECK(i < 0, "moe_align_block_size: topk_ids must lie in [0, ", num_experts, "), got ",
                static_cast<int64_t>(ids[i]), " at flat index ", i);
  }

  std::vector<int32_t> offsets(num_experts + 1);
  at::parallel_for(0, num_experts, 64, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t total = column_total(counts.data(), 0, rows, num_experts, e);
      offsets[e] = static_cast<int32_t>(padded_count(total, block_size));
    }
  });
  int64_t next = 0;  // exclusive prefix: offsets[e] = start of expert e's run
  for (int64_t e = 0; e <= num_experts; ++e) {
    const int64_t padded = e < num_experts ? offsets[e] : 0;
    offsets[e] = static_cast<int32_t>(next);
    next += padded;
  }
  at::parallel_for(0, num_experts, 64, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) column_to_bases(counts.data(), 0, rows, num_experts, e, offsets[e]);
  });

  std::fill(sorted, sorted + sizes.max_num_tokens_padded, static_cast<int32_t>(n));
  at::parallel_for(0, rows, 1, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      int32_t* base = counts.data() + r * num_experts;
      for (int64_t i = tile_begin(r, kCpuTile, n); i < tile_end(r, kCpuTile, n); ++i) {
        sorted[base[static_cast<int64_t>(ids[i])]++] = static_cast<int32_t>(i);
      }
    }
  });
  at::parallel_for(0, sizes.max_num_blocks, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) expert_ids[b] = expert_of_block(offsets.data(), num_experts, b, block_size);
  });
  post_padded[0] = offsets[num_experts];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cpu(const at::Tensor& topk_ids,
                                                                         int64_t block_size, int64_t num_experts) {
  const AlignSizes sizes = check_moe_align_block_size(topk_ids, block_size, num_experts);
  auto [sorted, expert_ids, post_padded] = empty_moe_align_outputs(topk_ids, sizes);
  const at::Tensor ids = topk_ids.contiguous();
  auto run = [&](auto tag) {
    using Id = decltype(tag);
    moe_align_cpu_impl(ids.const_data_ptr<Id>(), sizes, block_size, num_experts, sorted.mutable_data_ptr<int32_t>(),
                       expert_ids.mutable_data_ptr<int32_t>(), post_padded.mutable_data_ptr<int32_t>());
  };
  if (ids.scalar_type() == at::kInt) {
    run(int32_t{});
  } else {
    run(int64_t{});
  }
  return {sorted, expert_ids, post_padded};
}

TORCH_LIBRARY_IMPL(qwen_fast, CPU, m) { m.impl("moe_align_block_size", &moe_align_block_size_cpu); }

}  // namespace qwen_fast
