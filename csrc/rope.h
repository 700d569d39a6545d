// Per-element logic of rotary_embedding and qk_norm_rope_and_cache, shared by the CPU and CUDA implementations.
//
// One head row x [D] of one token: optionally RMS-normalized (Qwen3's q_norm / k_norm), then rotated by its token's
// cos/sin row, written to the output and optionally to a cache page row. The roundings are those of the references
// (qwen_fast/reference/rope.py, qk_norm_rope_and_cache):
//   n = Scalar(x * inv_rms)          inv_rms = 1 / sqrt(mean(x^2) + eps), fp32 math, rounded to the input dtype
//   y = Scalar(weight * n)           the fp32 product of two Scalars, rounded to Scalar (torch's Scalar multiply)
//   out1 = y1 * cos - y2 * sin       in promote(Scalar, table dtype): fp32 for an fp32 table (one rounding at the
//   out2 = y2 * cos + y1 * sin       end), Scalar for a table in the input dtype (each product and sum rounded)
// Pairs are (i, i + D/2) for neox (rotate-half) and (2i, 2i + 1) for interleaved. A worker handles pairs begin,
// begin + step, ... of a row (CPU: begin 0, step 1; CUDA: a warp per head row, its lanes striding). All math is
// fp32 with explicit round_to<Scalar> steps, and the pair layout and norm are compile-time flags, so that the CPU
// loops vectorize.
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "macros.h"

namespace qwen_fast {

// Strides of rotary_embedding / qk_norm_rope_and_cache's tensors (elements). Rows of D are contiguous; positions and
// slots may be strided or expanded (stride 0) views.
struct RopeLayout {
  int64_t positions_stride, slot_stride;    // positions [T], slot_mapping [T]
  int64_t cos_sin_stride;                   // cos_sin_cache [max_position, D], row stride
  int64_t q_token_stride, q_head_stride;    // query [T, Hq, D]
  int64_t k_token_stride, k_head_stride;    // key [T, Hkv, D]
  int64_t v_token_stride, v_head_stride;    // value [T, Hkv, D] (fused op only)
  int64_t qo_token_stride, ko_token_stride;  // outputs [T, Hq, D] and [T, Hkv, D], contiguous
  int64_t block_stride, page_stride, cache_head_stride, block_size;  // caches [num_blocks, block_size, Hkv, D]
  int64_t num_q_heads, num_kv_heads, head_dim;
  float eps;
  bool is_neox;
};

// Rounds fp32 to Scalar (round to nearest even, as c10 and torch). On the host, bfloat16 is rounded with integer ops
// and a select for NaN instead of c10's branch on isnan, so that the CPU row loops vectorize; same bits.
template <typename Scalar>
QF_HOST_DEVICE Scalar round_to(float x) {
  return static_cast<Scalar>(x);
}
#ifndef __CUDA_ARCH__
template <>
inline c10::BFloat16 round_to<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}
#endif

// 1 / sqrt(mean + eps) from the row's sum of squares (fp32), as the reference's rsqrt(mean(x^2) + eps).
QF_HOST_DEVICE float inverse_rms(float sum_squares, int64_t head_dim, float eps) {
  return 1.0f / sqrtf(sum_squares / static_cast<float>(head_dim) + eps);
}

// Element of the normalized row: Scalar(x * inv_rms), times the weight and rounded again (kNorm), else x itself.
template <bool kNorm, typename Scalar>
QF_HOST_DEVICE float normalize(Scalar x, Scalar weight, float inv_rms) {
  if (!kNorm) return static_cast<float>(x);
  const float n = static_cast<float>(round_to<Scalar>(static_cast<float>(x) * inv_rms));
  return static_cast<float>(round_to<Scalar>(static_cast<float>(weight) * n));
}

// One rotated element, a * c - b * s or (with the signs folded into b) b * c + a * s, from values exact in Math: for an
// fp32 table one rounding at the end; for a table in Scalar (kRoundEach) each product and the sum rounded to Scalar.
template <bool kRoundEach, typename Scalar>
QF_HOST_DEVICE Scalar rotate(float a, float c, float b, float s, bool minus) {
  if (!kRoundEach) return round_to<Scalar>(minus ? a * c - b * s : a * c + b * s);
  const float ac = static_cast<float>(round_to<Scalar>(a * c));
  const float bs = static_cast<float>(round_to<Scalar>(b * s));
  return round_to<Scalar>(minus ? ac - bs : ac + bs);
}

// Normalizes (kNorm) and rotates the pairs begin, begin + step, ... of one head row x into out: pairs (i, i + D/2) for
// kNeox, else (2i, 2i + 1). cos/sin: the token's table row halves [D/2]. Pointers do not alias.
template <bool kNeox, bool kNorm, typename Scalar, typename Cache>
QF_HOST_DEVICE void norm_rope_row(const Scalar* __restrict__ x, const Scalar* __restrict__ weight, float inv_rms,
                                  const Cache* __restrict__ cos, const Cache* __restrict__ sin,
                                  Scalar* __restrict__ out, int64_t half, int64_t begin, int64_t step) {
  constexpr bool kRoundEach = !std::is_same<Cache, float>::value;
  for (int64_t i = begin; i < half; i += step) {
    const int64_t first = kNeox ? i : 2 * i, second = kNeox ? i + half : 2 * i + 1;
    const float a = normalize<kNorm>(x[first], kNorm ? weight[first] : Scalar(0), inv_rms);
    const float b = normalize<kNorm>(x[second], kNorm ? weight[second] : Scalar(0), inv_rms);
    const float c = static_cast<float>(cos[i]), s = static_cast<float>(sin[i]);
    out[first] = rotate<kRoundEach, Scalar>(a, c, b, s, true);
    out[second] = rotate<kRoundEach, Scalar>(b, c, a, s, false);
  }
}

// Calls norm_rope_row with is_neox and (weight != nullptr) as compile-time flags.
template <typename Scalar, typename Cache>
QF_HOST_DEVICE void norm_rope_row(const Scalar* x, const Scalar* weight, float inv_rms, const Cache* cos,
                                  const Cache* sin, Scalar* out, int64_t half, bool is_neox, int64_t begin,
                                  int64_t step) {
  if (is_neox) {
    if (weight != nullptr) {
      norm_rope_row<true, true>(x, weight, inv_rms, cos, sin, out, half, begin, step);
    } else {
      norm_rope_row<true, false>(x, weight, inv_rms, cos, sin, out, half, begin, step);
    }
  } else if (weight != nullptr) {
    norm_rope_row<false, true>(x, weight, inv_rms, cos, sin, out, half, begin, step);
  } else {
    norm_rope_row<false, false>(x, weight, inv_rms, cos, sin, out, half, begin, step);
  }
}

// Page row of a cache slot (element offset of head 0), or -1 for a negative (padding) slot.
QF_HOST_DEVICE int64_t cache_row(int64_t slot, const RopeLayout& l) {
  if (slot < 0) return -1;
  return (slot / l.block_size) * l.block_stride + (slot % l.block_size) * l.page_stride;
}

// The tensors of one call. rotary_embedding leaves the norm weights, value and caches null.
template <typename Scalar, typename Cache>
struct RopeArgs {
  const int64_t* positions;  // [T], stride l.positions_stride
  const Scalar* query;       // [T, Hq, D]
  const Scalar* key;         // [T, Hkv, D]
  const Scalar* value;       // [T, Hkv, D] or null
  const Scalar* q_weight;    // [D] contiguous, or null (no norm)
  const Scalar* k_weight;    // [D] contiguous, or null
  const Cache* cos_sin;      // [max_position, D]: [cos | sin], rows l.cos_sin_stride apart
  Scalar* query_out;         // [T, Hq, D], contiguous
  Scalar* key_out;           // [T, Hkv, D], contiguous
  Scalar* key_cache;         // [num_blocks, block_size, Hkv, D] or null
  Scalar* value_cache;       // key_cache's layout or null
  const int64_t* slots;      // [T] (stride l.slot_stride) or null
};

// Token's row of the cos/sin table: cos at [0, D/2), sin at [D/2, D).
template <typename Scalar, typename Cache>
QF_HOST_DEVICE const Cache* cos_sin_row(const RopeArgs<Scalar, Cache>& a, const RopeLayout& l, int64_t token) {
  return a.cos_sin + a.positions[token * l.positions_stride] * l.cos_sin_stride;
}

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
  const int64_t row = a.key_cache == nullptr ? -1 : cache_row(a.slots[token * l.slot_stride], l);
  if (row >= 0) {
    r.cache = a.key_cache + row + head * l.cache_head_stride;
    r.value = a.value + token * l.v_token_stride + head * l.v_head_stride;
    r.value_cache = a.value_cache + row + head * l.cache_head_stride;
  }
  return r;
}

// The worker's part (elements begin, begin + step, ...) of a row's sum of squares, in fp32. Eight accumulators, so
// that the CPU's adds pipeline instead of waiting on one chain (3x on a 128-element row); the order differs from
// torch's mean by float rounding only (the tolerance table covers it). On CUDA (step 32) the tail loop does it all.
template <typename Scalar>
QF_HOST_DEVICE float partial_sum_squares(const Scalar* x, int64_t head_dim, int64_t begin, int64_t step) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  const int64_t count = begin < head_dim ? (head_dim - begin + step - 1) / step : 0;  // elements of this worker
  const int64_t whole = count / 8 * 8;
  const Scalar* row = x + begin;
  for (int64_t j = 0; j < whole; j += 8) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float v = static_cast<float>(row[(j + k) * step]);
      acc[k] += v * v;
    }
  }
  for (int64_t j = whole; j < count; ++j) {
    const float v = static_cast<float>(row[j * step]);
    acc[0] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Elements begin, begin + step, ... of a row copied from src to dst.
template <typename Scalar>
QF_HOST_DEVICE void copy_row(const Scalar* src, Scalar* dst, int64_t head_dim, int64_t begin, int64_t step) {
  for (int64_t d = begin; d < head_dim; d += step) dst[d] = src[d];
}

// The worker's part of one head row, given the row's full sum of squares: norm and rope into the output row. Then
// (after the caller syncs the workers of a row, on CUDA) copy_rows_to_cache writes its cache rows.
template <typename Scalar, typename Cache>
QF_HOST_DEVICE void process_row(const HeadRow<Scalar>& r, const Cache* cos, float sum_squares, const RopeLayout& l,
                                int64_t begin, int64_t step) {
  const int64_t half = l.head_dim / 2;
  const float inv_rms = r.weight == nullptr ? 1.0f : inverse_rms(sum_squares, l.head_dim, l.eps);
  norm_rope_row(r.x, r.weight, inv_rms, cos, cos + half, r.out, half, l.is_neox, begin, step);
}

template <typename Scalar>
QF_HOST_DEVICE void copy_rows_to_cache(const HeadRow<Scalar>& r, const RopeLayout& l, int64_t begin, int64_t step) {
  if (r.cache == nullptr) return;
  copy_row(r.out, r.cache, l.head_dim, begin, step);
  copy_row(r.value, r.value_cache, l.head_dim, begin, step);
}

}  // namespace qwen_fast
