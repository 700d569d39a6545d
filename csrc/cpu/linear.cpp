// CPU linear for the decode step's dense projections: out [M, N] = input [M, K] . weight[N, K]^T (+ bias [N]), the
// weights read once, in place, in the model dtype (fp32/bf16/fp16), with fp32 accumulation and one rounding to
// the dtype at the end (qwen_fast/reference/linear.py). Why: at M = 1 ATen's fp32 GEMV read the demo model's
// projections at about 9-14 GB/s on the 2-core Zen 4 VM, where the experts' dot tiles (moe_tiles.h) read at about
// 21 GB/s; q/k/v/o, the routers and the LM head were 37-45% of a batch-1 decode step.
//
// Algorithm. The input rows are converted once to fp32 [M, K] (read in place when already fp32 with unit column
// stride). Work item = a block of kBlock weight rows (output columns). tiles::float_rows gives its weight rows as
// fp32, kTileN at a time (in place when fp32 with unit column stride, else converted into the thread's scratch
// [kTileN, K], small enough to stay in L1/L2 while it is used); then for each tile of up to kDotRows input rows the
// dot tiles compute the products as 8-lane fp32 accumulators: kTileN weight rows per tile for 1-2 input rows
// (kTileN weight streams in flight at M = 1), 2 for 3-4 rows (4 x 2 = 8 accumulators + 4 input vectors: within
// AVX2's 16 registers). The block's [M, kBlock] results get the bias (fp32) and are rounded to the dtype once. Each
// weight row is read from memory once and from cache for the next row tiles: the kernel is right for any M, and the
// fast path up to M = 16 (qwen_fast/ops/linear.py MAX_ROWS; from there ATen's packed GEMM is faster).
//
// Threads: the blocks are split over at::parallel_for in contiguous ranges (at least kMinWork weight elements per
// task, so tiny layers stay on one thread). Determinism: each output element is one dot product, computed by one
// thread in an order fixed by K alone: the same bits run to run and for every thread count (tested). Between
// machines the last bit can differ: QF_CPU_CLONES picks the AVX2 + FMA code or the baseline code per machine.
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "moe_tiles.h"
#include "vec.h"

namespace qwen_fast {
namespace {

constexpr int64_t kBlock = 16;          // weight rows (output columns) per work item
constexpr int64_t kTileN = 4;           // weight rows per dot tile for 1-2 input rows
constexpr int64_t kMinWork = 1 << 16;   // weight elements per parallel task, at least
static_assert(kBlock % kTileN == 0 && kBlock % vec::kLanes == 0, "whole tiles and vectors per block");

template <typename T>
struct LinearWork {
  tiles::Matrix<T> weight;  // [N, K]
  const float* x;           // [M, K] fp32 rows, ldx apart
  int64_t ldx, rows, n, k;
  const float* bias;  // [N] fp32, or null
  T* out;             // [M, N] contiguous
};

// Output columns n0 .. n0 + nb (nb <= kBlock) of every row, kTileN weight rows at a time: tiles::float_rows gives
// them as fp32 rows (in place for fp32, else converted into scratch [kTileN, K], which stays in L1/L2 while every
// row tile reads it), then the dot tiles of each input row tile write tile [rows, kBlock]; last, bias and one
// rounding per output element.
template <typename T>
QF_VEC_INLINE void linear_block(const LinearWork<T>& w, int64_t n0, int64_t nb, float* scratch, float* tile) {
  for (int64_t j0 = 0; j0 < nb; j0 += kTileN) {
    const int64_t nj = std::min(kTileN, nb - j0);
    int64_t ld;
    const float* b = tiles::float_rows(w.weight, n0 + j0, nj, w.k, scratch, &ld);
    const float* cols[kTileN];
    for (int64_t j = 0; j < nj; ++j) cols[j] = b + j * ld;
    for (int64_t i0 = 0; i0 < w.rows; i0 += tiles::kDotRows) {
      const int64_t m = std::min(tiles::kDotRows, w.rows - i0);
      const float* a[tiles::kDotRows];
      for (int64_t i = 0; i < m; ++i) a[i] = w.x + (i0 + i) * w.ldx;
      float* c = tile + i0 * kBlock + j0;
      if (nj == kTileN && m == 1) {
        tiles::dot_tile<1, kTileN>(a, cols, w.k, c, kBlock, 1);
      } else if (nj == kTileN && m == 2) {
        tiles::dot_tile<2, kTileN>(a, cols, w.k, c, kBlock, 1);
      } else {  // 3-4 rows: 2 weight rows per tile (8 accumulators); the odd last weight row alone
        int64_t j = 0;
        for (; j + 2 <= nj; j += 2) tiles::dot_rows<2>(m, a, cols + j, w.k, c + j, kBlock, 1);
        if (j < nj) tiles::dot_rows<1>(m, a, cols + j, w.k, c + j, kBlock, 1);
      }
    }
  }
  for (int64_t i = 0; i < w.rows; ++i) {
    for (int64_t v = 0; v < nb; v += vec::kLanes) {
      const int64_t count = std::min(vec::kLanes, nb - v);
      vec::Vec acc = vec::load(tile + i * kBlock + v);
      if (w.bias != nullptr) acc += vec::load_partial(w.bias + n0 + v, count);
      vec::store_as(w.out + i * w.n + n0 + v, acc, count);
    }
  }
}

template <typename T>
QF_VEC_INLINE void linear_blocks_impl(const LinearWork<T>& w, int64_t lo, int64_t hi) {
  std::vector<float> scratch(std::is_same_v<T, float> && w.weight.col_stride == 1 ? 0 : kTileN * w.k);
  std::vector<float> tile(w.rows * kBlock, 0.0f);  // zeros: the columns past a last partial block are loaded, unused
  for (int64_t block = lo; block < hi; ++block) {
    const int64_t n0 = block * kBlock;
    linear_block(w, n0, std::min(kBlock, w.n - n0), scratch.data(), tile.data());
  }
}

// One non-template entry per dtype, each compiled for AVX2 + FMA and for the baseline (QF_CPU_CLONES).
#define QF_DEFINE_LINEAR_BLOCKS(T)                                                      \
  QF_CPU_CLONES void linear_blocks(const LinearWork<T>& w, int64_t lo, int64_t hi) { \
    linear_blocks_impl(w, lo, hi);                                                    \
  }
QF_DEFINE_LINEAR_BLOCKS(float)
QF_DEFINE_LINEAR_BLOCKS(c10::BFloat16)
QF_DEFINE_LINEAR_BLOCKS(c10::Half)
#undef QF_DEFINE_LINEAR_BLOCKS

}  // namespace

at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() >= 1 && weight.dim() == 2, "linear: input must be [*, K] and weight [N, K], got ",
              input.sizes(), " and ", weight.sizes());
  const int64_t k = weight.size(1), n = weight.size(0);
  TORCH_CHECK(input.size(-1) == k, "linear: input [*, K] = ", input.sizes(), " does not fit weight [N, K] = ",
              weight.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16 ||
                  input.scalar_type() == at::kHalf,
              "linear: input must be float32, bfloat16 or float16, got ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "linear: weight must have input's dtype ",
              input.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == input.scalar_type()),
              "linear: bias must be [N] = [", n, "] in input's dtype ", input.scalar_type());
  std::vector<int64_t> out_sizes(input.sizes().begin(), input.sizes().end());
  out_sizes.back() = n;
  at::Tensor out = at::empty(out_sizes, input.options());
  int64_t m = 1;  // the rows: input's leading sizes (not numel / K, which K = 0 would break)
  for (int64_t d = 0; d + 1 < input.dim(); ++d) m *= input.size(d);
  if (m == 0 || n == 0) return out;
  const at::Tensor x2 = input.reshape({m, k});
  const bool x_in_place = x2.scalar_type() == at::kFloat && x2.stride(1) == 1;
  const at::Tensor x32 = x_in_place ? x2 : x2.to(at::kFloat).contiguous();
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, kBlock * k));
  AT_DISPATCH_V2(input.scalar_type(), "linear_cpu", AT_WRAP([&] {
    const LinearWork<scalar_t> work{{weight.const_data_ptr<scalar_t>(), weight.stride(0), weight.stride(1)},
                                    x32.const_data_ptr<float>(), x32.stride(0), m, n, k,
                                    bias.has_value() ? bias32.const_data_ptr<float>() : nullptr,
                                    out.mutable_data_ptr<scalar_t>()};
    at::parallel_for(0, blocks, grain, [&](int64_t lo, int64_t hi) { linear_blocks(work, lo, hi); });
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

TORCH_LIBRARY_IMPL(qwen_fast, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace qwen_fast
