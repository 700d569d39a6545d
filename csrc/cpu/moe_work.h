// The pieces of the CPU experts (moe.cpp) that its ISA-specific tiles (moe_avx512.cpp) share: the work of one call,
// the item sizes, the gated activation with the reference's roundings, and the stores of act and y.
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>

#include "isa.h"
#include "moe_tiles.h"
#include "vec.h"

namespace qwen_fast {
namespace moe {

constexpr int64_t kGateBlock = 16;     // intermediate columns per gate/up item: its fp32 panels are 2 * 16 * H floats
constexpr int64_t kDownBlock = 32;     // hidden columns per down item: its fp32 panels are 32 * I floats
constexpr int64_t kOuterMinRows = 32;  // an expert with this many rows packs its weights for outer_tile
static_assert(kGateBlock % vec::kLanes == 0 && kDownBlock % tiles::kPanelCols == 0, "whole panels per block");

enum class Stage { kGateUp, kDown, kCombine };

// Everything one call's stages read and write. Pairs are numbered by their sorted position s (grouped by expert,
// expert e owning s in [start[e], start[e + 1])); pair[s] is the flat index t * k + j, token[s] = t. T is the
// activation dtype, W the weights' (T, or float8_e4m3fn / int8 with scales in the matrices).
template <typename T, typename W>
struct Work {
  const tiles::Matrix<W>* w13;  // [E] matrices [2I, H]
  const tiles::Matrix<W>* w2;   // [E] matrices [H, I]
  int64_t hidden, inter, topk, experts;  // experts: E
  const float* x;  // [T, H] fp32 token rows, ldx apart
  int64_t ldx;
  const int64_t* start;   // [E + 1]
  const int64_t* pair;    // [P]
  const int64_t* token;   // [P]
  const int64_t* active;  // experts with pairs, ascending
  const float* weight;    // [T, k] fp32 routing weights
  float* act;             // [P, I] by sorted position
  float* y;               // [P, H] by flat pair index
  T* out;                 // [T, H]
  bool gelu;              // activation: gelu (exact, erf) instead of silu
  Isa isa;                // the instruction set this call runs with (cpu_isa())
  // bf16 dot products (isa avx512_bf16, bf16 activations and weights), else null: the token rows as bf16, ldxb
  // apart, and act [P, I] again in bf16 (exact: act holds bf16 values), written beside act.
  const c10::BFloat16* xb;
  int64_t ldxb;
  c10::BFloat16* actb;
};

// gelu(x) = x / 2 * (1 + erf(x / sqrt(2))) (the exact GELU, torch's approximate="none"), lane by lane.
QF_VEC_INLINE vec::Vec gelu(vec::Vec x) {
  vec::Vec out;
  for (int64_t i = 0; i < vec::kLanes; ++i) out[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
  return out;
}

// act = T(T(act_fn(T(gate))) * T(up)), act_fn silu or gelu: the reference's roundings (each GEMM output, the
// activation, the product).
template <typename T>
QF_VEC_INLINE vec::Vec gated(vec::Vec gate, vec::Vec up, bool use_gelu) {
  gate = vec::round_to<T>(gate);
  return vec::round_to<T>(vec::round_to<T>(use_gelu ? gelu(gate) : vec::silu(gate)) * vec::round_to<T>(up));
}

// act[s, n .. n + count) = gated(gate, up) (count <= kLanes), and its bf16 copy when the call keeps one.
template <typename T, typename W>
QF_VEC_INLINE void store_act(const Work<T, W>& w, int64_t s, int64_t n, vec::Vec gate, vec::Vec up, int64_t count) {
  const vec::Vec act = gated<T>(gate, up, w.gelu);
  vec::store_as(w.act + s * w.inter + n, act, count);
  if (w.actb != nullptr) vec::store_as(w.actb + s * w.inter + n, act, count);
}

// Gate/up items whose gate and up values are in two [rows, kGateBlock] buffers: rows s0 .. s0 + m, columns
// n0 .. n0 + nb.
template <typename T, typename W>
QF_VEC_INLINE void store_acts(const Work<T, W>& w, int64_t s0, int64_t m, int64_t n0, int64_t nb, const float* gate,
                              const float* up) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t v = 0; v < nb; v += vec::kLanes) {
      store_act(w, s0 + i, n0 + v, vec::load(gate + i * kGateBlock + v), vec::load(up + i * kGateBlock + v),
                std::min(vec::kLanes, nb - v));
    }
  }
}

// y[pair[s0 + i], h0 + c0 .. + count) = T(tile[i * ld ..]) for i < m: a down item's results, rounded to the dtype.
template <typename T, typename W>
QF_VEC_INLINE void store_ys(const Work<T, W>& w, int64_t s0, int64_t m, int64_t h0, int64_t count, const float* tile,
                            int64_t ld) {
  for (int64_t i = 0; i < m; ++i) {
    float* y = w.y + w.pair[s0 + i] * w.hidden + h0;
    for (int64_t v = 0; v < count; v += vec::kLanes) {
      vec::store_as(y + v, vec::round_to<T>(vec::load(tile + i * ld + v)), std::min(vec::kLanes, count - v));
    }
  }
}

namespace avx512 {

// Steps 2 and 3 of moe.cpp for one item of an expert with few routed rows (dot tiles), with AVX-512 tiles that read
// the weight rows in place in their dtype and convert them in registers (moe_avx512.cpp). False when the item needs
// the generic tiles instead: a weight layout or fp8 block shape these tiles do not take, or a build without them.
template <typename T, typename W>
bool gate_up_item(const Work<T, W>& w, int64_t e, int64_t n0, int64_t nb);
template <typename T, typename W>
bool down_item(const Work<T, W>& w, int64_t e, int64_t h0, int64_t nb);

}  // namespace avx512
}  // namespace moe
}  // namespace qwen_fast
