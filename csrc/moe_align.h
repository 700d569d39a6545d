// Logic of moe_align_block_size shared by the CPU and CUDA implementations (contract: qwen_fast/reference/
// moe_align.py). The flat ids (N = T * k of them) are cut into `rows` contiguous tiles; counts[r][e] is the number
// of ids of tile r routed to expert e. From that matrix:
//   offsets[e]   = sum_{e' < e} padded_count(total[e'])             where expert e's run starts (a block multiple)
//   base[r][e]   = offsets[e] + sum_{r' < r} counts[r'][e]          where tile r writes its first id of expert e
// Within a tile, ids are written in ascending flat index (CPU: a sequential loop; CUDA: rounds of 32 lanes ranked
// with __match_any_sync), so each expert's run holds its flat indices in ascending order and the result is the
// same bits whatever the tile count. This is a counting sort (a radix-sort pass with E buckets).
#pragma once

#include "macros.h"

namespace qwen_fast {

// Buffer sizes from the shapes alone (no host sync): at most min(E, N) experts have ids, each padding by at most
// block_size - 1 entries.
struct AlignSizes {
  int64_t num_pairs;              // N = T * k, also the padding sentinel of sorted_token_ids
  int64_t max_num_tokens_padded;  // len(sorted_token_ids)
  int64_t max_num_blocks;         // len(expert_ids)
};

QF_HOST_DEVICE AlignSizes align_sizes(int64_t num_pairs, int64_t num_experts, int64_t block_size) {
  const int64_t active = num_experts < num_pairs ? num_experts : num_pairs;
  const int64_t padded = num_pairs + active * (block_size - 1);
  return AlignSizes{num_pairs, padded, (padded + block_size - 1) / block_size};
}

// An id outside [0, num_experts) belongs to no expert. The CPU kernel rejects it; the CUDA kernel cannot check
// without a host sync, so it skips such ids (they are neither counted nor written, and never index out of bounds).
QF_HOST_DEVICE bool is_expert(int64_t id, int64_t num_experts) { return id >= 0 && id < num_experts; }

// A run of `count` ids rounded up to whole blocks (0 for an expert with no ids).
QF_HOST_DEVICE int64_t padded_count(int64_t count, int64_t block_size) {
  return (count + block_size - 1) / block_size * block_size;
}

// Tile r of `rows` equal tiles of `tile` ids covers flat indices [r * tile, min((r + 1) * tile, N)).
QF_HOST_DEVICE int64_t tile_begin(int64_t row, int64_t tile, int64_t num_pairs) {
  const int64_t begin = row * tile;
  return begin < num_pairs ? begin : num_pairs;
}
QF_HOST_DEVICE int64_t tile_end(int64_t row, int64_t tile, int64_t num_pairs) {
  return tile_begin(row + 1, tile, num_pairs);
}

// Ids of expert e in tiles [row_begin, row_end): part of column e of the [rows, stride] count matrix (the CPU sums
// whole columns; the CUDA prefix sums a column in chunks, one thread each).
QF_HOST_DEVICE int64_t column_total(const int32_t* counts, int64_t row_begin, int64_t row_end, int64_t stride,
                                    int64_t expert) {
  int64_t total = 0;
  for (int64_t r = row_begin; r < row_end; ++r) total += counts[r * stride + expert];
  return total;
}

// Turns rows [row_begin, row_end) of column e of the count matrix, in place, into the write bases of those tiles:
// base[r][e] = offset + the ids of expert e in tiles row_begin .. r - 1, where offset is the write position of the
// chunk's first tile (expert e's run start plus the ids of the tiles before the chunk).
QF_HOST_DEVICE void column_to_bases(int32_t* counts, int64_t row_begin, int64_t row_end, int64_t stride,
                                    int64_t expert, int64_t offset) {
  int64_t next = offset;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t count = counts[r * stride + expert];
    counts[r * stride + expert] = static_cast<int32_t>(next);
    next += count;
  }
}

// expert_ids[block]: the expert whose run holds entry block * block_size, or 0 past the used entries (vLLM's fill: a
// valid id; consumers stop at num_tokens_post_padded). offsets has
// num_experts + 1 entries (offsets[E] = num_tokens_post_padded). The largest e with offsets[e] <= start has a
// nonempty run (an empty expert e has offsets[e] == offsets[e + 1], and offsets[E] > start), so it is the answer.
QF_HOST_DEVICE int32_t expert_of_block(const int32_t* offsets, int64_t num_experts, int64_t block, int64_t block_size) {
  const int64_t start = block * block_size;
  if (start >= offsets[num_experts]) return 0;
  int64_t low = 0, high = num_experts - 1;  // invariant: offsets[low] <= start < offsets[high + 1]
  while (low < high) {
    const int64_t mid = (low + high + 1) / 2;
    if (offsets[mid] <= start) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  return static_cast<int32_t>(low);
}

}  // namespace qwen_fast
