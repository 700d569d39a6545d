// The fp32 register tiles of the CPU experts (moe.cpp): C = A . B^T for A = a few routed rows [m, len] and B = a
// block of weight rows [n, len] (both with unit stride along len), in two forms.
//
// dot_tile (few rows): each C element is a dot product over len, kept as an 8-lane accumulator and summed
// pairwise at the end. B is read in place (fp32) or from a converted (dequantized) copy of the item's rows: no
// packing, the right form when a weight row meets only one to a few routed rows.
// outer_tile (many rows): B packed transposed into a panel [len, 16] (pack_panel), then per k one broadcast of
// each row's A[i, k] times two 8-lane panel vectors: no horizontal sums; packing (8 x 8 register transposes) costs
// one pass over the block, repaid when enough rows share it (moe.cpp's kOuterMinRows). 6 rows x 2 vectors = 12
// accumulators + 2 panel vectors + 1 broadcast: 15 of the 16 AVX2 registers (the classic 6x16 fp32 micro-kernel
// shape of BLIS-style GEMMs).
#pragma once

#include <algorithm>
#include <type_traits>

#include "vec.h"

namespace qwen_fast {
namespace tiles {

constexpr int64_t kDotRows = 4;    // rows per dot_tile
constexpr int64_t kOuterRows = 6;  // rows per outer_tile
constexpr int64_t kPanelCols = 2 * vec::kLanes;

// One expert's weight matrix [rows, cols] in its storage dtype W, through its strides (in elements). Quantized
// weights (W int8 or float8_e4m3fn) carry fp32 scales: W[r, c] = float(data[r, c]) * scale_at(r, c), the scale of
// the block (r / bn, c / bk) at scale + (r / bn) * scale_row_stride + (c / bk) * scale_col_stride (int8 per output
// channel: bn = 1, bk = cols, scale_col_stride = 0). scale is null for fp32/fp16/bf16 weights.
template <typename W>
struct Matrix {
  const W* data;
  int64_t row_stride, col_stride;
  const float* scale = nullptr;
  int64_t scale_row_stride = 0, scale_col_stride = 0, bn = 1, bk = 1;

  QF_VEC_INLINE float scale_at(int64_t r, int64_t c) const {
    return scale[(r / bn) * scale_row_stride + (c / bk) * scale_col_stride];
  }
};

// The dequantized m[r, k .. k + kLanes) (unit column stride): one scale for the whole vector unless a block edge
// falls inside it.
template <typename W>
QF_VEC_INLINE vec::Vec load_row(const Matrix<W>& m, int64_t r, int64_t k) {
  const vec::Vec v = vec::load_float(m.data + r * m.row_stride + k);
  if (m.scale == nullptr) return v;
  if (k / m.bk == (k + vec::kLanes - 1) / m.bk) return m.scale_at(r, k) * v;
  vec::Vec s;
  for (int64_t l = 0; l < vec::kLanes; ++l) s[l] = m.scale_at(r, k + l);
  return s * v;
}

// The dequantized m[r, c] for any strides.
template <typename W>
QF_VEC_INLINE float element(const Matrix<W>& m, int64_t r, int64_t c) {
  const float v = static_cast<float>(m.data[r * m.row_stride + c * m.col_stride]);
  return m.scale == nullptr ? v : v * m.scale_at(r, c);
}

// Rows r0 .. r0 + n of m as (dequantized) fp32 rows of `cols` floats, *ld apart: read in place when m is fp32 with
// unit column stride, else converted into scratch [n, cols] (the item's own tile of weights, never a whole matrix).
template <typename W>
QF_VEC_INLINE const float* float_rows(const Matrix<W>& m, int64_t r0, int64_t n, int64_t cols, float* scratch,
                                      int64_t* ld) {
  if constexpr (std::is_same_v<W, float>) {
    if (m.col_stride == 1) {
      *ld = m.row_stride;
      return m.data + r0 * m.row_stride;
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    float* dst = scratch + r * cols;
    if (m.col_stride == 1) {
      vec::to_float(m.data + (r0 + r) * m.row_stride, dst, cols);
      if (m.scale != nullptr) {  // one scale per block of bk columns
        for (int64_t c0 = 0; c0 < cols; c0 += m.bk) {
          const float s = m.scale_at(r0 + r, c0);
          for (int64_t c = c0; c < std::min(cols, c0 + m.bk); ++c) dst[c] *= s;
        }
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) dst[c] = element(m, r0 + r, c);
    }
  }
  *ld = cols;
  return scratch;
}

// panel[k * kPanelCols + c] = m[rows[c], k] dequantized, for k < len, c < kPanelCols; 0 where rows[c] < 0
// (padding). Eight whole rows with unit column stride go through 8 x 8 register transposes; the rest element by
// element.
template <typename W>
QF_VEC_INLINE void pack_panel(const Matrix<W>& m, const int64_t* rows, int64_t len, float* panel) {
  for (int64_t c0 = 0; c0 < kPanelCols; c0 += vec::kLanes) {
    bool whole = m.col_stride == 1;
    for (int64_t c = c0; c < c0 + vec::kLanes; ++c) whole = whole && rows[c] >= 0;
    int64_t k = 0;
    if (whole) {
      for (; k + vec::kLanes <= len; k += vec::kLanes) {
        vec::Vec block[vec::kLanes];
        for (int64_t c = 0; c < vec::kLanes; ++c) block[c] = load_row(m, rows[c0 + c], k);
        vec::transpose8(block);
        for (int64_t i = 0; i < vec::kLanes; ++i) vec::store(panel + (k + i) * kPanelCols + c0, block[i]);
      }
    }
    for (int64_t c = c0; c < c0 + vec::kLanes; ++c) {
      for (int64_t i = k; i < len; ++i) panel[i * kPanelCols + c] = rows[c] < 0 ? 0.0f : element(m, rows[c], i);
    }
  }
}

// c[i * ldc + j * ldn] = sum_k a[i][k] * b[j][k] for i < MR, j < NR.
template <int MR, int NR>
QF_VEC_INLINE void dot_tile(const float* const* a, const float* const* b, int64_t len, float* c, int64_t ldc,
                            int64_t ldn) {
  vec::Vec acc[MR][NR] = {};
  int64_t k = 0;
  for (; k + vec::kLanes <= len; k += vec::kLanes) {
    vec::Vec av[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) av[i] = vec::load(a[i] + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const vec::Vec bv = vec::load(b[j] + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] += av[i] * bv;
    }
  }
  if (k < len) {  // the last partial vector, zero-padded
    for (int j = 0; j < NR; ++j) {
      const vec::Vec bv = vec::load_partial(b[j] + k, len - k);
      for (int i = 0; i < MR; ++i) acc[i][j] += vec::load_partial(a[i] + k, len - k) * bv;
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) c[i * ldc + j * ldn] = vec::hsum(acc[i][j]);
  }
}

// dot_tile for a runtime row count 1 <= m <= kDotRows.
template <int NR>
QF_VEC_INLINE void dot_rows(int64_t m, const float* const* a, const float* const* b, int64_t len, float* c,
                            int64_t ldc, int64_t ldn) {
  static_assert(kDotRows == 4, "one case per row count");
  switch (m) {
    case 4: return dot_tile<4, NR>(a, b, len, c, ldc, ldn);
    case 3: return dot_tile<3, NR>(a, b, len, c, ldc, ldn);
    case 2: return dot_tile<2, NR>(a, b, len, c, ldc, ldn);
    default: return dot_tile<1, NR>(a, b, len, c, ldc, ldn);
  }
}

// c[i * kPanelCols + col] = sum_k a[i][k] * panel[k * kPanelCols + col] for i < MR, col < kPanelCols.
template <int MR>
QF_VEC_INLINE void outer_tile(const float* const* a, const float* panel, int64_t len, float* c) {
  vec::Vec lo[MR] = {}, hi[MR] = {};
  for (int64_t k = 0; k < len; ++k) {
    const vec::Vec b0 = vec::load(panel + k * kPanelCols), b1 = vec::load(panel + k * kPanelCols + vec::kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float ai = a[i][k];  // scalar * vector: one broadcast load (vec::splat here costs 8 inserts in GCC 12)
      lo[i] += ai * b0;
      hi[i] += ai * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    vec::store(c + i * kPanelCols, lo[i]);
    vec::store(c + i * kPanelCols + vec::kLanes, hi[i]);
  }
}

// outer_tile for a runtime row count 1 <= m <= kOuterRows.
QF_VEC_INLINE void outer_rows(int64_t m, const float* const* a, const float* panel, int64_t len, float* c) {
  static_assert(kOuterRows == 6, "one case per row count");
  switch (m) {
    case 6: return outer_tile<6>(a, panel, len, c);
    case 5: return outer_tile<5>(a, panel, len, c);
    case 4: return outer_tile<4>(a, panel, len, c);
    case 3: return outer_tile<3>(a, panel, len, c);
    case 2: return outer_tile<2>(a, panel, len, c);
    default: return outer_tile<1>(a, panel, len, c);
  }
}

}  // namespace tiles
}  // namespace qwen_fast
