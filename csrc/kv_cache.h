// Per-thread logic of reshape_and_cache, shared by the CPU and CUDA implementations.
//
// One token's rows of key and value (Hkv heads of D elements) are copied to the cache page row that its slot names:
// block = slot / block_size, offset = slot % block_size. A worker copies dims begin, begin + step, ... of every head
// (CPU: one worker per token, step 1, so the inner loop is a contiguous copy; CUDA: a thread block per token, step
// blockDim.x). Elements are moved as raw bits of their size, so one instantiation serves every dtype of a size.
#pragma once

#include "macros.h"

namespace qwen_fast {

struct CacheLayout {
  int64_t token_stride;       // key/value stride of dim 0
  int64_t head_stride;        // key/value stride of dim 1
  int64_t block_stride;       // cache stride of dim 0 (one block)
  int64_t page_stride;        // cache stride of dim 1 (one slot inside a block)
  int64_t cache_head_stride;  // cache stride of dim 2
  int64_t block_size;
  int64_t num_heads;
  int64_t head_dim;
};

template <typename Bits>
QF_HOST_DEVICE void copy_token_to_cache(const Bits* key, const Bits* value, Bits* key_cache, Bits* value_cache,
                                        int64_t token, int64_t slot, const CacheLayout& l, int64_t begin,
                                        int64_t step) {
  if (slot < 0) return;  // padding token
  const int64_t block = slot / l.block_size;
  const int64_t offset = slot % l.block_size;
  const int64_t src_row = token * l.token_stride;
  const int64_t dst_row = block * l.block_stride + offset * l.page_stride;
  for (int64_t head = 0; head < l.num_heads; ++head) {
    const int64_t src = src_row + head * l.head_stride;
    const int64_t dst = dst_row + head * l.cache_head_stride;
    for (int64_t dim = begin; dim < l.head_dim; dim += step) {
      key_cache[dst + dim] = key[src + dim];
      value_cache[dst + dim] = value[src + dim];
    }
  }
}

}  // namespace qwen_fast
