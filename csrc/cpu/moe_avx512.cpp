// AVX-512 tiles for the decode-shaped items of the CPU experts (moe.cpp steps 2 and 3 for an expert with fewer than
// kOuterMinRows routed rows: at T <= 16 every expert). At decode the experts are bound by reading their weights, so
// these tiles read each weight row once per routed row, in place and in its own dtype, and convert it in registers:
// nothing is copied or dequantized into memory first (the generic dot tiles convert an item's rows into fp32
// scratch).
//
// A tile: one routed row (A, in L1) x 16 consecutive weight rows (B, streamed; an expert's other routed rows read
// them again from L1/L2), one 16-lane accumulator per weight row, reduced at the end into one vector of the 16 dot
// products by a transpose-and-add tree (reduce16: about 3 instructions per weight row instead of a horizontal sum
// of 4 levels each, which would cost as much as the products at I = 192). Per weight dtype, B as fp32:
//   fp32: loaded;  fp16: vcvtph2ps;  bf16 (isa avx512): widened (<< 16);  int8: sign-extend + vcvtdq2ps, the 16
//   rows' channel scales applied to the 16 finished sums;
//   float8_e4m3fn: the byte moved into an fp16 (sign to bit 15, exponent and mantissa to bits 13 .. 7), which is
//   the e4m3 value times 2^-8 exactly, subnormals included (e4m3's bias is 7, fp16's 15), then vcvtph2ps; the
//   block's scale times 256 multiplies A (one [bn, bk] block covers the 16 rows and each 16-column vector: tiles
//   whose rows straddle an n-block edge, or bk % 16 != 0, take the generic tiles). e4m3's NaN (0x7f / 0xff) reads
//   as +-480 here.
// bf16 weights with isa avx512_bf16 and bf16 activations: vdpbf16ps on the bf16 token rows and bf16 act rows
// (products exact, fp32 accumulation; the instruction treats bf16 denormals as zero).
// Rows past the item's last are read as its last row again (results dropped); columns past K are masked off.
// Everything after the dot products (gated activation, roundings, stores) is moe_work.h's, as in the generic path.
// Results differ from the generic tiles' in the last bits (summation order), never between runs or thread counts.
#include <algorithm>
#include <type_traits>

#include "moe_work.h"

#if QF_X86_ISA
#include <immintrin.h>
// GCC 12's AVX-512 headers start some intrinsics from an "undefined" register and warn where they are inlined.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace qwen_fast {
namespace moe {
namespace avx512 {

#if QF_X86_ISA
namespace {

constexpr int kRows = 16;  // weight rows per tile: 16 accumulators + A + B in the 32 zmm registers

template <typename W>
constexpr bool kFp8 = std::is_same_v<W, c10::Float8_e4m3fn>;
template <typename W>
constexpr bool kInt8 = std::is_same_v<W, int8_t>;

// r[j] = the sum of v[j]'s lanes, j < 16: add pairs of vectors interleaved (within 128-bit lanes), then of those,
// then across the 128-bit lanes; each level halves the vector count.
QF_TARGET_AVX512 QF_VEC_INLINE __m512 reduce16(const __m512 (&v)[kRows]) {
  __m512 t[8], u[4], w[2];
#pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
#pragma GCC unroll 16
  for (int i = 0; i < 4; ++i) {
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xee));
  }
#pragma GCC unroll 16
  for (int i = 0; i < 2; ++i) {
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
}

// 16 weights as fp32 (fp8: times 2^-8); with kMasked, lanes outside `mask` 0 (unmasked loads fold into the
// conversions).
template <bool kMasked>
QF_TARGET_AVX512 QF_VEC_INLINE __m128i load_bytes(const void* p, __mmask16 mask) {
  return kMasked ? _mm_maskz_loadu_epi8(mask, p) : _mm_loadu_si128(static_cast<const __m128i*>(p));
}

template <bool kMasked>
QF_TARGET_AVX512 QF_VEC_INLINE __m256i load_halves(const void* p, __mmask16 mask) {
  return kMasked ? _mm256_maskz_loadu_epi16(mask, p) : _mm256_loadu_si256(static_cast<const __m256i*>(p));
}

template <typename W, bool kMasked>
QF_TARGET_AVX512 QF_VEC_INLINE __m512 load16(const W* p, __mmask16 mask) {
  if constexpr (std::is_same_v<W, float>) {
    return kMasked ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<W, c10::Half>) {
    return _mm512_cvtph_ps(load_halves<kMasked>(p, mask));
  } else if constexpr (std::is_same_v<W, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load_halves<kMasked>(p, mask)), 16));
  } else if constexpr (kInt8<W>) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load_bytes<kMasked>(p, mask)));
  } else {
    static_assert(kFp8<W>, "float, half, bfloat16, int8 or float8_e4m3fn weights");
    const __m256i high = _mm256_slli_epi16(_mm256_cvtepu8_epi16(load_bytes<kMasked>(p, mask)), 8);
    // (b << 8) >> 1 arithmetic: the sign in bits 15 and 14, the other 7 bits in 13 .. 7; clearing bit 14 leaves
    // the fp16 of value * 2^-8.
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_srai_epi16(high, 1), _mm256_set1_epi16(-0x4001)));
  }
}

template <typename W, bool kMasked>
QF_TARGET_AVX512 QF_VEC_INLINE void fma_step(__m512 (&acc)[kRows], __m512 a, const W* const (&b)[kRows], int64_t k,
                                             __mmask16 mask) {
#pragma GCC unroll 16
  for (int j = 0; j < kRows; ++j) acc[j] = _mm512_fmadd_ps(a, load16<W, kMasked>(b[j] + k, mask), acc[j]);
}

// The 16 dot products of the fp32 row a [len] with weight rows r0 .. r0 + 16 of m (the last `valid` - 1 repeated
// past it), dequantized: fp32 activations, B converted in registers.
template <typename W>
QF_TARGET_AVX512 void dot16_f32(const float* a, const tiles::Matrix<W>& m, int64_t r0, int64_t valid, int64_t len,
                                const char* next, float* out) {
  constexpr int kLines = 16 * 16 * sizeof(W) / 64;  // cache lines of B one step reads: prefetched from `next`
  const W* b[kRows];
#pragma GCC unroll 16
  for (int j = 0; j < kRows; ++j) b[j] = m.data + (r0 + std::min<int64_t>(j, valid - 1)) * m.row_stride;
  __m512 acc[kRows];
#pragma GCC unroll 16
  for (int j = 0; j < kRows; ++j) acc[j] = _mm512_setzero_ps();
  const int64_t block = kFp8<W> ? m.bk : len;  // fp8: A times the block's scale, per block of bk columns
  for (int64_t k0 = 0; k0 < len; k0 += block) {
    const int64_t k1 = std::min(len, k0 + block);
    __m512 scale = _mm512_set1_ps(1.0f);
    if constexpr (kFp8<W>) scale = _mm512_set1_ps(m.scale_at(r0, k0) * 256.0f);
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
      if (next != nullptr) {
#pragma GCC unroll 16
        for (int q = 0; q < kLines; ++q) _mm_prefetch(next + 64 * q, _MM_HINT_T0);
        next += 64 * kLines;
      }
      __m512 av = _mm512_loadu_ps(a + k);
      if constexpr (kFp8<W>) av = _mm512_mul_ps(av, scale);
      fma_step<W, false>(acc, av, b, k, 0xffff);
    }
    if (k < k1) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (k1 - k)) - 1);
      __m512 av = _mm512_maskz_loadu_ps(mask, a + k);
      if constexpr (kFp8<W>) av = _mm512_mul_ps(av, scale);
      fma_step<W, true>(acc, av, b, k, mask);
    }
  }
  __m512 sums = reduce16(acc);
  if constexpr (kInt8<W>) {  // per output channel
    float scales[kRows];
  #pragma GCC unroll 16
    for (int j = 0; j < kRows; ++j) scales[j] = m.scale_at(r0 + std::min<int64_t>(j, valid - 1), 0);
    sums = _mm512_mul_ps(sums, _mm512_loadu_ps(scales));
  }
  _mm512_storeu_ps(out, sums);
}

template <bool kMasked>
QF_TARGET_AVX512_BF16 QF_VEC_INLINE void dot_step(__m512 (&acc)[kRows], __m512i a,
                                                  const c10::BFloat16* const (&b)[kRows], int64_t k, __mmask32 mask) {
#pragma GCC unroll 16
  for (int j = 0; j < kRows; ++j) {
    const __m512i bv = kMasked ? _mm512_maskz_loadu_epi16(mask, b[j] + k) : _mm512_loadu_si512(b[j] + k);
    acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)a, (__m512bh)bv);
  }
}

// dot16_f32 for bf16 activations and weights: vdpbf16ps, 32 products per instruction.
QF_TARGET_AVX512_BF16 void dot16_bf16(const c10::BFloat16* a, const tiles::Matrix<c10::BFloat16>& m, int64_t r0,
                                      int64_t valid, int64_t len, const char* next, float* out) {
  constexpr int kLines = 16 * 32 * 2 / 64;
  const c10::BFloat16* b[kRows];
#pragma GCC unroll 16
  for (int j = 0; j < kRows; ++j) b[j] = m.data + (r0 + std::min<int64_t>(j, valid - 1)) * m.row_stride;
  __m512 acc[kRows];
#pragma GCC unroll 16
  for (int j = 0; j < kRows; ++j) acc[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= len; k += 32) {
    if (next != nullptr) {
#pragma GCC unroll 16
      for (int q = 0; q < kLines; ++q) _mm_prefetch(next + 64 * q, _MM_HINT_T0);
      next += 64 * kLines;
    }
    dot_step<false>(acc, _mm512_loadu_si512(a + k), b, k, 0xffffffffu);
  }
  if (k < len) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (len - k)) - 1);
    dot_step<true>(acc, _mm512_maskz_loadu_epi16(mask, a + k), b, k, mask);
  }
  _mm512_storeu_ps(out, reduce16(acc));
}

// out[0 .. 16) = the dot products of row a with rows r0 .. r0 + 16 of m, prefetching the 16 rows at `next` (the
// tile that follows in this thread's order; null: none) as it goes: the hardware prefetchers lose the stream where
// the order jumps between gate and up rows (measured: about 1.7x on the gate/up loop of int8 experts).
template <typename A, typename W>
QF_VEC_INLINE void dot16(const A* a, const tiles::Matrix<W>& m, int64_t r0, int64_t valid, int64_t len,
                         const W* next, float* out) {
  const char* ahead = reinterpret_cast<const char*>(next);
  if constexpr (std::is_same_v<A, float>) {
    dot16_f32(a, m, r0, valid, len, ahead, out);
  } else {
    dot16_bf16(a, m, r0, valid, len, ahead, out);
  }
}

// The first of the next expert with routed rows after e (or -1): where the next item of a stage begins.
template <typename T, typename W>
QF_VEC_INLINE int64_t next_active(const Work<T, W>& w, int64_t e, int64_t experts_end) {
  for (int64_t f = e + 1; f < experts_end; ++f) {
    if (w.start[f + 1] > w.start[f]) return f;
  }
  return -1;
}

// Whether these tiles take rows r0 .. r0 + count of m: unit column stride; fp8 blocks whole vectors wide and the
// rows inside one n-block.
template <typename W>
bool takes(const tiles::Matrix<W>& m, int64_t r0, int64_t count) {
  if (m.col_stride != 1) return false;
  if constexpr (kFp8<W>) {
    for (int64_t r = r0; r < r0 + count; r += kRows) {
      if (r / m.bn != (std::min(r + kRows, r0 + count) - 1) / m.bn) return false;
    }
    return m.bk % 16 == 0;
  }
  return true;
}

// Step 2 for expert e, intermediate columns n0 .. n0 + nb (nb <= kGateBlock = 16): per routed row, the 16 gate
// rows, then the 16 up rows; the first routed row's pass prefetches the up rows, then the next item's gate rows.
template <bool kBf16Dot, typename A, typename T, typename W>
QF_VEC_INLINE void gate_up(const Work<T, W>& w, int64_t e, int64_t n0, int64_t nb, int64_t experts) {
  static_assert(kGateBlock == kRows, "one tile of gate rows and one of up rows per item");
  const tiles::Matrix<W>& m = w.w13[e];
  const int64_t next_e = n0 + kGateBlock < w.inter ? e : next_active(w, e, experts);
  const W* next_gate = next_e < 0 ? nullptr
                                  : w.w13[next_e].data + (next_e == e ? n0 + kGateBlock : 0) * w.w13[next_e].row_stride;
  float gate[kGateBlock], up[kGateBlock];
  for (int64_t s = w.start[e]; s < w.start[e + 1]; ++s) {
    const A* a;
    if constexpr (kBf16Dot) {
      a = w.xb + w.token[s] * w.ldxb;
    } else {
      a = w.x + w.token[s] * w.ldx;
    }
    const bool first = s == w.start[e];
    dot16(a, m, n0, nb, w.hidden, first ? m.data + (w.inter + n0) * m.row_stride : nullptr, gate);
    dot16(a, m, w.inter + n0, nb, w.hidden, first ? next_gate : nullptr, up);
    store_acts(w, s, 1, n0, nb, gate, up);
  }
}

// Step 3 for expert e, hidden columns h0 .. h0 + nb (nb <= kDownBlock): per routed row, 16 w2 rows at a time, the
// first routed row's pass prefetching the next 16.
template <bool kBf16Dot, typename A, typename T, typename W>
QF_VEC_INLINE void down(const Work<T, W>& w, int64_t e, int64_t h0, int64_t nb, int64_t experts) {
  const tiles::Matrix<W>& m = w.w2[e];
  float out[kDownBlock];
  for (int64_t s = w.start[e]; s < w.start[e + 1]; ++s) {
    const A* a;
    if constexpr (kBf16Dot) {
      a = w.actb + s * w.inter;
    } else {
      a = w.act + s * w.inter;
    }
    for (int64_t c = 0; c < nb; c += kRows) {
      const W* next = nullptr;
      if (s == w.start[e]) {
        const int64_t next_e = h0 + c + kRows < w.hidden ? e : next_active(w, e, experts);
        if (next_e >= 0) next = w.w2[next_e].data + (next_e == e ? h0 + c + kRows : 0) * w.w2[next_e].row_stride;
      }
      dot16(a, m, h0 + c, std::min<int64_t>(kRows, nb - c), w.inter, next, out + c);
    }
    store_ys(w, s, 1, h0, nb, out, kDownBlock);
  }
}

template <typename T, typename W>
QF_TARGET_AVX512 __attribute__((noinline)) void gate_up_f32(const Work<T, W>& w, int64_t e, int64_t n0, int64_t nb, int64_t experts) {
  gate_up<false, float>(w, e, n0, nb, experts);
}
template <typename T, typename W>
QF_TARGET_AVX512 __attribute__((noinline)) void down_f32(const Work<T, W>& w, int64_t e, int64_t h0, int64_t nb, int64_t experts) {
  down<false, float>(w, e, h0, nb, experts);
}
template <typename T, typename W>
QF_TARGET_AVX512_BF16 __attribute__((noinline)) void gate_up_bf16(const Work<T, W>& w, int64_t e, int64_t n0,
                                                                  int64_t nb, int64_t experts) {
  gate_up<true, c10::BFloat16>(w, e, n0, nb, experts);
}
template <typename T, typename W>
QF_TARGET_AVX512_BF16 __attribute__((noinline)) void down_bf16(const Work<T, W>& w, int64_t e, int64_t h0,
                                                               int64_t nb, int64_t experts) {
  down<true, c10::BFloat16>(w, e, h0, nb, experts);
}

}  // namespace

template <typename T, typename W>
bool gate_up_item(const Work<T, W>& w, int64_t e, int64_t n0, int64_t nb) {
  const int64_t experts = w.experts;
  if (!takes(w.w13[e], n0, nb) || !takes(w.w13[e], w.inter + n0, nb)) return false;
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    if (w.xb != nullptr) return gate_up_bf16(w, e, n0, nb, experts), true;
  }
  gate_up_f32(w, e, n0, nb, experts);
  return true;
}

template <typename T, typename W>
bool down_item(const Work<T, W>& w, int64_t e, int64_t h0, int64_t nb) {
  const int64_t experts = w.experts;
  if (!takes(w.w2[e], h0, nb)) return false;
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    if (w.actb != nullptr) return down_bf16(w, e, h0, nb, experts), true;
  }
  down_f32(w, e, h0, nb, experts);
  return true;
}

#else  // no AVX-512 targets in this build: the generic tiles do everything

template <typename T, typename W>
bool gate_up_item(const Work<T, W>&, int64_t, int64_t, int64_t) {
  return false;
}
template <typename T, typename W>
bool down_item(const Work<T, W>&, int64_t, int64_t, int64_t) {
  return false;
}

#endif

#define QF_INSTANTIATE(T, W)                                                                \
  template bool gate_up_item<T, W>(const Work<T, W>&, int64_t, int64_t, int64_t); \
  template bool down_item<T, W>(const Work<T, W>&, int64_t, int64_t, int64_t);
#define QF_INSTANTIATE_ALL(T)              \
  QF_INSTANTIATE(T, T)                     \
  QF_INSTANTIATE(T, c10::Float8_e4m3fn)    \
  QF_INSTANTIATE(T, int8_t)
QF_INSTANTIATE_ALL(float)
QF_INSTANTIATE_ALL(c10::BFloat16)
QF_INSTANTIATE_ALL(c10::Half)
#undef QF_INSTANTIATE_ALL
#undef QF_INSTANTIATE

}  // namespace avx512
}  // namespace moe
}  // namespace qwen_fast
