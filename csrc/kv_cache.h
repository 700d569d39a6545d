// Per-thread logic of reshape_and_cache, shared by the CPU and CUDA implementations.
//
// One token's row of key (and value), Hkv * D elements, is copied to the cache page row that its slot names:
// block = slot / block_size, offset = slot % block_size. Element e of the row is head e / D, dim e % D. A worker
// copies the elements begin, begin + step, ... (CPU: one worker per token, step 1; CUDA: a thread block per token,
// step blockDim.x). Elements are moved as raw bits of their size, so one instantiation serves every dtype of a size.
#pragma once

#include "macros.h"

namespace qwen_fast {

struct CacheLayout {
  int64_t token_stride;  // key/value stride of dim 0
  int64_t head_stride;   // key/value stride of dim 1
  int64_t block_stride;  // cache stride of dim 0 (one block)
  int64_t page_stride;   // cache stride of dim 1 (one slot inside a block)
  int64_t cache_head_stride;  // cache stride of dim 2
  int64_t block_size;
  int64_t head_dim;
  int64_t row_elems;  // Hkv * D
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
  for (int64_t e = begin; e < l.row_elems; e += step) {
    const int64_t head = e / l.head_dim;
    const int64_t dim = e % l.head_dim;
    const int64_t src = src_row + head * l.head_stride + dim;
    const int64_t dst = dst_row + head * l.cache_head_stride + dim;
    key_cache[dst] = key[src];
    value_cache[dst] = value[src];
  }
}

}  // namespace qwen_fast
