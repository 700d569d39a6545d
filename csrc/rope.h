// Per-element logic of rotary_embedding and qk_norm_rope_and_cache, shared by the CPU and CUDA implementations.
//
// One head row x [D] of one token: optionally RMS-normalized (Qwen3's q_norm / k_norm), then rotated by its token's
// cos/sin row, written to the output and optionally to a cache page row. The roundings are those of the references
// (qwen_fast/reference/rope.py, qk_norm_rope_and_cache):
//   n = Scalar(x * inv_rms)          inv_rms = 1 / sqrt(mean(x^2) + eps), fp32 math, rounded to the input dtype
//   y = weight * n                   in Scalar: c10::Half / c10::BFloat16 arithmetic rounds the fp32 product
//   out1 = y1 * cos - y2 * sin       in Math = promote(Scalar, cache dtype): float for an fp32 cache (one rounding at
//   out2 = y2 * cos + y1 * sin       the end), Scalar for a cache in the input dtype (every operation rounded)
// Pairs are (i, i + D/2) for neox (rotate-half) and (2i, 2i + 1) for interleaved. A worker handles pairs begin,
// begin + step, ... of a row (CPU: begin 0, step 1; CUDA: a warp per head row, its lanes striding).
#pragma once

#include <cmath>
#include <type_traits>

#include "macros.h"

namespace qwen_fast {

// Strides of rotary_embedding / qk_norm_rope_and_cache's tensors (elements). Rows of D are contiguous.
struct RopeLayout {
  int64_t q_token_stride, q_head_stride;    // query [T, Hq, D]
  int64_t k_token_stride, k_head_stride;    // key [T, Hkv, D]
  int64_t v_token_stride, v_head_stride;    // value [T, Hkv, D] (fused op only)
  int64_t qo_token_stride, ko_token_stride;  // outputs [T, Hq, D] and [T, Hkv, D], contiguous
  int64_t block_stride, page_stride, cache_head_stride, block_size;  // caches [num_blocks, block_size, Hkv, D]
  int64_t num_q_heads, num_kv_heads, head_dim;
  float eps;
  bool is_neox;
};

// Element indices of pair i of a row of D = 2 * half elements.
QF_HOST_DEVICE int64_t pair_first(int64_t i, int64_t half, bool is_neox) { return is_neox ? i : 2 * i; }
QF_HOST_DEVICE int64_t pair_second(int64_t i, int64_t half, bool is_neox) { return is_neox ? i + half : 2 * i + 1; }

// 1 / sqrt(mean + eps) from the row's sum of squares (fp32), as the reference's rsqrt(mean(x^2) + eps).
QF_HOST_DEVICE float inverse_rms(float sum_squares, int64_t head_dim, float eps) {
  return 1.0f / sqrtf(sum_squares / static_cast<float>(head_dim) + eps);
}

// Element of the normalized row: Scalar(x * inv_rms) times the weight, in Scalar. weight == nullptr: no norm.
template <typename Scalar>
QF_HOST_DEVICE Scalar normalize(Scalar x, const Scalar* weight, int64_t index, float inv_rms) {
  if (weight == nullptr) return x;
  const Scalar n = static_cast<Scalar>(static_cast<float>(x) * inv_rms);
  return static_cast<Scalar>(weight[index] * n);
}

// Page row of a cache slot (element offset of head 0), or -1 for a negative (padding) slot.
QF_HOST_DEVICE int64_t cache_row(int64_t slot, const RopeLayout& l) {
  if (slot < 0) return -1;
  return (slot / l.block_size) * l.block_stride + (slot % l.block_size) * l.page_stride;
}

// Normalizes (when weight != nullptr) and rotates the pairs begin, begin + step, ... of one head row x, writing out
// and, when cache != nullptr, the cache row. cos/sin point at the token's cache row halves.
template <typename Scalar, typename Cache>
QF_HOST_DEVICE void norm_rope_row(const Scalar* x, const Scalar* weight, float inv_rms, const Cache* cos,
                                  const Cache* sin, Scalar* out, Scalar* cache, int64_t half, bool is_neox,
                                  int64_t begin, int64_t step) {
  // Math: float for an fp32 cache, else the input dtype (per-operation rounding, as the reference in that dtype).
  using Math = typename std::conditional<std::is_same<Cache, float>::value, float, Scalar>::type;
  for (int64_t i = begin; i < half; i += step) {
    const int64_t first = pair_first(i, half, is_neox), second = pair_second(i, half, is_neox);
    const Math a = static_cast<Math>(normalize(x[first], weight, first, inv_rms));
    const Math b = static_cast<Math>(normalize(x[second], weight, second, inv_rms));
    const Math c = static_cast<Math>(cos[i]), s = static_cast<Math>(sin[i]);
    const Scalar out1 = static_cast<Scalar>(a * c - b * s);
    const Scalar out2 = static_cast<Scalar>(b * c + a * s);
    out[first] = out1;
    out[second] = out2;
    if (cache != nullptr) {
      cache[first] = out1;
      cache[second] = out2;
    }
  }
}

// The tensors of one call. rotary_embedding leaves the norm weights, value and caches null.
template <typename Scalar, typename Cache>
struct RopeArgs {
  const int64_t* positions;  // [T]
  const Scalar* query;       // [T, Hq, D]
  const Scalar* key;         // [T, Hkv, D]
  const Scalar* value;       // [T, Hkv, D] or null
  const Scalar* q_weight;    // [D] or null (no norm)
  const Scalar* k_weight;    // [D] or null
  const Cache* cos_sin;      // [max_position, D]: [cos | sin]
  Scalar* query_out;         // [T, Hq, D], contiguous
  Scalar* key_out;           // [T, Hkv, D], contiguous
  Scalar* key_cache;         // [num_blocks, block_size, Hkv, D] or null
  Scalar* value_cache;       // key_cache's layout or null
  const int64_t* slots;      // [T] or null
};

// Where head `head` of token `token` reads and writes: heads [0, Hq) are query heads, [Hq, Hq + Hkv) key heads
// (with their value rows and, unless the slot is padding, cache rows).
template <typename Scalar>
struct HeadRow {
  const Scalar* x;
  const Scalar* weight;
  Scalar* out;
  Scalar* cache;              // rotated key row in key_cache, or null
  const Scalar* value;        // value row to copy, or null
  Scalar* value_cache;        // its row in value_cache
};

template <typename Scalar, typename Cache>
QF_HOST_DEVICE HeadRow<Scalar> head_row(const RopeArgs<Scalar, Cache>& a, const RopeLayout& l, int64_t token,
                                        int64_t head) {
  HeadRow<Scalar> r{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  if (head < l.num_q_heads) {
    r.x = a.query + token * l.q_token_stride + head * l.q_head_stride;
    r.weight = a.q_weight;
    r.out = a.query_out + token * l.qo_token_stride + head * l.head_dim;
    return r;
  }
  head -= l.num_q_heads;
  r.x = a.key + token * l.k_token_stride + head * l.k_head_stride;
  r.weight = a.k_weight;
  r.out = a.key_out + token * l.ko_token_stride + head * l.head_dim;
  const int64_t row = a.key_cache == nullptr ? -1 : cache_row(a.slots[token], l);
  if (row >= 0) {
    r.cache = a.key_cache + row + head * l.cache_head_stride;
    r.value = a.value + token * l.v_token_stride + head * l.v_head_stride;
    r.value_cache = a.value_cache + row + head * l.cache_head_stride;
  }
  return r;
}

// The worker's part (elements begin, begin + step, ...) of a row's sum of squares, in fp32.
template <typename Scalar>
QF_HOST_DEVICE float partial_sum_squares(const Scalar* x, int64_t head_dim, int64_t begin, int64_t step) {
  float sum = 0.0f;
  for (int64_t d = begin; d < head_dim; d += step) {
    const float v = static_cast<float>(x[d]);
    sum += v * v;
  }
  return sum;
}

// The worker's part of one head row, given the row's full sum of squares: norm, rope, outputs, cache rows.
template <typename Scalar, typename Cache>
QF_HOST_DEVICE void process_row(const HeadRow<Scalar>& r, const Cache* cos, float sum_squares, const RopeLayout& l,
                                int64_t begin, int64_t step) {
  const int64_t half = l.head_dim / 2;
  const float inv_rms = r.weight == nullptr ? 1.0f : inverse_rms(sum_squares, l.head_dim, l.eps);
  norm_rope_row(r.x, r.weight, inv_rms, cos, cos + half, r.out, r.cache, half, l.is_neox, begin, step);
  if (r.value != nullptr) {
    for (int64_t d = begin; d < l.head_dim; d += step) r.value_cache[d] = r.value[d];
  }
}

}  // namespace qwen_fast
