// Portable fp32 SIMD for the CPU kernels: an 8-lane float vector (GCC/Clang vector extension, one AVX2 register),
// conversions from the model dtypes, rounding to them, and exp/silu.
//
// Why not at::vec::Vectorized: the extension is built without -mavx2, so ATen's headers give it the generic
// (scalar-loop) Vectorized. Instead the hot functions of a kernel are compiled twice, for x86-64-v3 (AVX2 + FMA +
// F16C) and the baseline: with QF_CPU_CLONES (GCC target_clones, the loader picks one per machine), or as explicit
// variants that cpu_isa() (isa.h) picks at run time (fused_experts: QWEN_FAST_CPU_ISA can lower the level). Every
// helper here is always_inline so that it takes the instruction set of the function it lands in. Results can
// differ in the last bit between the two (FMA contraction), never between runs or thread counts on one machine.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define QF_CPU_CLONES
#endif
#define QF_VEC_INLINE inline __attribute__((always_inline))
#if defined(__clang__)
#define QF_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define QF_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, IVec{__VA_ARGS__})
#endif

// Vectors are passed between always_inline functions only: the ABI note about 32-byte vectors does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace qwen_fast {
namespace vec {

constexpr int64_t kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

QF_VEC_INLINE Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The first n < kLanes floats of p, zeros after.
QF_VEC_INLINE Vec load_partial(const float* p, int64_t n) {
  if (n == kLanes) return load(p);  // a constant-size copy: one vector load, not a call to memcpy
  Vec v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

QF_VEC_INLINE void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// For constants. A runtime scalar goes straight into `scalar * vector` instead: GCC lowers this constructor before
// inlining it into a clone and builds the vector with 8 inserts.
QF_VEC_INLINE Vec splat(float x) { return Vec{x, x, x, x, x, x, x, x}; }
static_assert(kLanes == 8, "splat lists 8 lanes");

// Pairwise sum of the lanes, in a fixed order.
QF_VEC_INLINE float hsum(Vec v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }

template <typename T>
QF_VEC_INLINE Vec load_float(const T* p);

// float(x) for n elements of a float, bfloat16, half, float8_e4m3fn or int8 array.
template <typename T>
QF_VEC_INLINE void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (std::is_same_v<T, c10::Float8_e4m3fn> || std::is_same_v<T, int8_t>) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) store(dst + i, load_float(src + i));
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t i = 0; i < n; ++i) {  // the upper half of the float's bits: vectorizes to a widen and a shift
      const uint32_t bits = static_cast<uint32_t>(src[i].x) << 16;
      std::memcpy(dst + i, &bits, sizeof(bits));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// float(x) per lane of float8_e4m3fn bit patterns b (0 .. 255 in int lanes), exact, with no denormal arithmetic
// (so a flush-denormals mode cannot change it): a normal value (exponent field > 0) gets its exponent rebiased
// (7 -> 127) and its 3 mantissa bits moved to the top of the float's; a subnormal one is m * 2^-9 (m = its 3 bits);
// 0x7f / 0xff (the format's only NaN) give NaN.
QF_VEC_INLINE Vec fp8_bits_to_float(IVec b) {
  const IVec mag = b & 0x7f;
  const Vec subnormal = __builtin_convertvector(mag, Vec) * (1.0f / 512);  // used only where mag < 8
  IVec sub_bits;
  std::memcpy(&sub_bits, &subnormal, sizeof(sub_bits));
  IVec bits = mag >= 8 ? (mag << 20) + (120 << 23) : sub_bits;
  bits = mag == 0x7f ? IVec{} + 0x7fc00000 : bits;
  bits |= (b & 0x80) << 24;
  Vec v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// float(p[0 .. kLanes)) of a float, bfloat16, half, float8_e4m3fn or int8 array.
template <typename T>
QF_VEC_INLINE Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load(p);
  } else if constexpr (std::is_same_v<T, c10::Float8_e4m3fn> || std::is_same_v<T, int8_t>) {
    typedef std::conditional_t<std::is_same_v<T, int8_t>, int8_t, uint8_t> Byte;
    typedef Byte Bytes __attribute__((vector_size(kLanes)));
    Bytes bytes;
    std::memcpy(&bytes, p, sizeof(bytes));
    const IVec wide = __builtin_convertvector(bytes, IVec);
    if constexpr (std::is_same_v<T, int8_t>) return __builtin_convertvector(wide, Vec);
    return fp8_bits_to_float(wide);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    typedef uint16_t Bits __attribute__((vector_size(kLanes * sizeof(uint16_t))));
    Bits half;
    std::memcpy(&half, p, sizeof(half));
    const IVec bits = __builtin_convertvector(half, IVec) << 16;  // widen, then the bf16 bits on top
    Vec v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    float tmp[kLanes];
    to_float(p, tmp, kLanes);
    return load(tmp);
  }
}

// Transposes the 8 x 8 block r[row][lane] in place: r[k][i] = old r[i][k]. Interleave pairs of rows, then pairs
// of pairs, then the 128-bit halves (the unpack / shuffle / permute sequence of an AVX 8 x 8 transpose).
QF_VEC_INLINE void transpose8(Vec* r) {
  static_assert(kLanes == 8, "an 8 x 8 transpose");
  Vec t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = QF_SHUFFLE(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = QF_SHUFFLE(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + m] holds columns m and m + 4 of rows i .. i + 3
    for (int m = 0; m < 2; ++m) {
      u[i + 2 * m] = QF_SHUFFLE(t[i + m], t[i + m + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * m + 1] = QF_SHUFFLE(t[i + m], t[i + m + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = QF_SHUFFLE(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[j + 4] = QF_SHUFFLE(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// float(T(x)) per lane: round to nearest even into T's precision (a no-op for float).
template <typename T>
QF_VEC_INLINE Vec round_to(Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    IVec bits;
    std::memcpy(&bits, &v, sizeof(v));
    const IVec lsb = (bits >> 16) & 1;  // arithmetic shift: the & keeps bit 16 only
    IVec rounded = (bits + 0x7fff + lsb) & static_cast<int32_t>(0xffff0000u);
    rounded = v != v ? bits : rounded;  // NaN stays NaN (c10::BFloat16 does the same)
    Vec out;
    std::memcpy(&out, &rounded, sizeof(out));
    return out;
  } else {
    Vec out;
    for (int64_t l = 0; l < kLanes; ++l) out[l] = static_cast<float>(static_cast<T>(v[l]));
    return out;
  }
}

// dst[0 .. n) = T(v[0 .. n)), n <= kLanes.
template <typename T>
QF_VEC_INLINE void store_as(T* dst, Vec v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kLanes) return store(dst, v);
    std::memcpy(dst, &v, n * sizeof(float));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const Vec r = round_to<T>(v);  // exact in bfloat16: keep the upper half of the bits
    IVec bits;
    std::memcpy(&bits, &r, sizeof(r));
    for (int64_t l = 0; l < n; ++l) dst[l].x = static_cast<uint16_t>(static_cast<uint32_t>(bits[l]) >> 16);
  } else {
    for (int64_t l = 0; l < n; ++l) dst[l] = static_cast<T>(v[l]);
  }
}

// exp(x) to about 1 ulp for x in [-87, 88] (clamped outside): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts,
// Cody-Waite), exp(r) by its degree-7 Taylor polynomial (truncation < 1e-8 relative), times 2^n built in the
// exponent bits.
QF_VEC_INLINE Vec exp(Vec x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const float kShift = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const Vec n = (x * 1.44269504f + kShift) - kShift;
  const Vec r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  Vec p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IVec exponent = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return p * scale;
}

// silu(x) = x / (1 + exp(-x)).
QF_VEC_INLINE Vec silu(Vec x) { return x / (1.0f + exp(-x)); }

}  // namespace vec
}  // namespace qwen_fast
