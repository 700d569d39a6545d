// Per-thread logic of reshape_and_cache, shared by the CPU and CUDA implementations.
//
// One token's rows of key and value (Hkv heads of D elements) are copied to the cache page row that its slot names:
// block = slot / block_size, offset = slot % block_size. A worker copies dims begin, begin + step, ... of every head
// (CPU: one worker per token, step 1, so the inner loop is a contiguous copy; CUDA: a thread block per token, step
// blockDim.x). Elements are moved as raw bits of their size, so one instantiation serves every dtype of a size.
//
// fp8 caches (vLLM's kv_cache_dtype "fp8"): quantize_token_to_cache stores each element as
// Float8_e4m3fn(clamp(float(x) / scale, -448, 448)) (fp32 division, vLLM's saturating cast, round to nearest even).
#pragma once

#include <c10/util/Float8_e4m3fn.h>

#include "macros.h"

namespace qwen_fast {

// Strides (elements) of a source [N, Hkv, D] and its cache [num_blocks, block_size, Hkv, D]; head dims contiguous.
struct CacheStrides {
  int64_t token;       // source dim 0
  int64_t head;        // source dim 1
  int64_t block;       // cache dim 0 (one block)
  int64_t page;        // cache dim 1 (one slot inside a block)
  int64_t cache_head;  // cache dim 2
};

// key/value and their caches each have their own strides (e.g. key and value sliced out of one fused projection,
// or K and V caches interleaved in one buffer).
struct CacheLayout {
  CacheStrides key;
  CacheStrides value;
  int64_t block_size;
  int64_t num_heads;
  int64_t head_dim;
};

// Copies dims begin, begin + step, ... of every head of row `token` of src to page row (block, offset) of cache.
template <typename Bits>
QF_HOST_DEVICE void copy_rows(const Bits* src, Bits* cache, const CacheStrides& s, const CacheLayout& l, int64_t token,
                              int64_t block, int64_t offset, int64_t begin, int64_t step) {
  const int64_t src_row = token * s.token;
  const int64_t dst_row = block * s.block + offset * s.page;
  for (int64_t head = 0; head < l.num_heads; ++head) {
    const int64_t src_head = src_row + head * s.head;
    const int64_t dst_head = dst_row + head * s.cache_head;
    for (int64_t dim = begin; dim < l.head_dim; dim += step) cache[dst_head + dim] = src[src_head + dim];
  }
}

template <typename Bits>
QF_HOST_DEVICE void copy_token_to_cache(const Bits* key, const Bits* value, Bits* key_cache, Bits* value_cache,
                                        int64_t token, int64_t slot, const CacheLayout& l, int64_t begin,
                                        int64_t step) {
  if (slot < 0) return;  // padding token
  const int64_t block = slot / l.block_size;
  const int64_t offset = slot % l.block_size;
  copy_rows(key, key_cache, l.key, l, token, block, offset, begin, step);
  copy_rows(value, value_cache, l.value, l, token, block, offset, begin, step);
}

// Like copy_rows, converting each element to fp8: x / scale clamped to e4m3's finite range.
template <typename scalar_t>
QF_HOST_DEVICE void quantize_rows(const scalar_t* src, c10::Float8_e4m3fn* cache, float scale, const CacheStrides& s,
                                  const CacheLayout& l, int64_t token, int64_t block, int64_t offset, int64_t begin,
                                  int64_t step) {
  const int64_t src_row = token * s.token;
  const int64_t dst_row = block * s.block + offset * s.page;
  for (int64_t head = 0; head < l.num_heads; ++head) {
    const int64_t src_head = src_row + head * s.head;
    const int64_t dst_head = dst_row + head * s.cache_head;
    for (int64_t dim = begin; dim < l.head_dim; dim += step) {
      const float x = static_cast<float>(src[src_head + dim]) / scale;
      cache[dst_head + dim] = c10::Float8_e4m3fn(x < -448.0f ? -448.0f : (x > 448.0f ? 448.0f : x));
    }
  }
}

template <typename scalar_t>
QF_HOST_DEVICE void quantize_token_to_cache(const scalar_t* key, const scalar_t* value, c10::Float8_e4m3fn* key_cache,
                                            c10::Float8_e4m3fn* value_cache, float k_scale, float v_scale,
                                            int64_t token, int64_t slot, const CacheLayout& l, int64_t begin,
                                            int64_t step) {
  if (slot < 0) return;  // padding token
  const int64_t block = slot / l.block_size;
  const int64_t offset = slot % l.block_size;
  quantize_rows(key, key_cache, k_scale, l.key, l, token, block, offset, begin, step);
  quantize_rows(value, value_cache, v_scale, l.value, l, token, block, offset, begin, step);
}

}  // namespace qwen_fast
