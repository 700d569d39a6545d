// CPU fused_experts: SwiGLU experts over the (token, choice) pairs grouped by expert, computed with fp32 register
// tiles (moe_tiles.h, vec.h) instead of per-expert ATen GEMMs, and the weighted fp32 combine over the k choices in
// j order. Why: at decode sizes (T <= 16: about 2 rows per expert) an ATen GEMM call per expert costs more than its
// arithmetic, and ATen's bf16 GEMM was slower than fp32; here every weight element is read once per call as fp32
// (converted on load) and the work of all experts is split over the threads in one pass per step.
//
// 1. Counting sort of the flat pairs i = t * k + j by expert (stable: ascending i within an expert), serial, O(T*k).
//    hidden_states as fp32 rows [T, H] (read in place when already fp32 with unit column stride).
// 2. Gate/up + SwiGLU (or GeGLU: activation "gelu"). Work item = (active expert e, block of kGateBlock
//    intermediate columns n). For each tile of the expert's routed rows the item computes gate (w13[e, n]) and up (w13[e, I + n]) together and applies SwiGLU
//    with the reference's roundings: gate and up rounded to the dtype (as a GEMM in that dtype rounds its output),
//    silu in fp32 rounded to the dtype, the product in fp32 rounded to the dtype. act [P, I] (fp32 holding values
//    exact in the dtype) is written in expert-sorted pair order.
// 3. Down projection. Work item = (active expert e, block of kDownBlock hidden columns h): w2[e, h] times the
//    expert's act rows, rounded to the dtype, written to y [P, H] (fp32) at the pairs' flat indices.
// 4. Combine, parallel over tokens: out[t] = sum_{j=0..k-1} float(w[t, j]) * y[t*k + j] in fp32, j ascending, then
//    one rounding to the dtype.
// Tile form per expert: fewer than kOuterMinRows rows -> dot tiles: on CPUs with AVX-512 the tiles of
// moe_avx512.cpp (weight rows read in place in their dtype, converted in registers; bf16 with vdpbf16ps), else the
// generic ones (weight rows read in place when fp32, else converted per item; 4 rows x 2 columns of 8-lane
// accumulators); more -> the item packs its weight block transposed into [len, 16] panels once and runs 6 x 16
// outer-product tiles over all the rows (the packing pass is repaid from about 32 rows on; measured on the bench
// shapes). Quantized weights (int8, float8_e4m3fn) are dequantized with their scales where they are converted.
//
// Threads: steps 2 and 3 split their items over the threads in contiguous ranges of about equal cost (rows + a
// per-item weight cost), so two threads share the work even when one or two experts are active. Determinism: each
// element of act, y and out is computed by exactly one item or token, in an order fixed by the shapes alone, so the
// result has the same bits run to run and for every thread count (tested). Between instruction sets it can differ
// in the last bits: cpu_isa() (isa.h) picks the AVX-512, AVX2 + FMA or baseline code per machine, and
// QWEN_FAST_CPU_ISA can lower it.
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "isa.h"
#include "moe_tiles.h"
#include "moe_work.h"
#include "vec.h"

namespace qwen_fast {
namespace {

using namespace moe;  // NOLINT: the shared pieces of this kernel (moe_work.h)

constexpr int64_t kDownTile = 2;  // hidden columns per down dot tile (the N)
constexpr int64_t kItemCost = 2;  // weight streaming of an item, in units of one routed row's FMAs
void check_fused_experts(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& topk_weights, const at::Tensor& topk_ids) {
  TORCH_CHECK(hidden.dim() == 2, "fused_experts: hidden_states must be [T, H], got ", hidden.sizes());
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, "fused_experts: w13 must be [E, 2I, H] and w2 [E, H, I], got ",
              w13.sizes(), " and ", w2.sizes());
  TORCH_CHECK(w13.size(2) == hidden.size(1) && w13.size(1) % 2 == 0 && w13.size(1) > 0,
              "fused_experts: w13 [E, 2I, H] = ", w13.sizes(), " does not fit hidden_states [T, H] = ", hidden.sizes());
  TORCH_CHECK(w2.size(0) == w13.size(0) && w2.size(1) == w13.size(2) && 2 * w2.size(2) == w13.size(1),
              "fused_experts: w2 must be [E, H, I] for w13 [E, 2I, H] = ", w13.sizes(), ", got ", w2.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16 ||
                  hidden.scalar_type() == at::kHalf,
              "fused_experts: hidden_states must be float32, bfloat16 or float16, got ", hidden.scalar_type());
  const at::ScalarType wtype = w13.scalar_type();
  TORCH_CHECK(w2.scalar_type() == wtype && (wtype == hidden.scalar_type() || wtype == at::kFloat8_e4m3fn ||
                                            wtype == at::kChar),
              "fused_experts: w13 and w2 must have hidden_states' dtype ", hidden.scalar_type(),
              " (or both be float8_e4m3fn or int8: quantized experts), got ", w13.scalar_type(), " and ",
              w2.scalar_type());
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == hidden.size(0),
              "fused_experts: topk_ids must be [T, k] with T = ", hidden.size(0), ", got ", topk_ids.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "fused_experts: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() && at::isFloatingType(topk_weights.scalar_type()),
              "fused_experts: topk_weights must be float [T, k] = ", topk_ids.sizes(), ", got ",
              topk_weights.scalar_type(), " ", topk_weights.sizes());
}

// One scale tensor of quantized experts: fp32 with the shape of its format (see fused_experts_cpu in ops.h).
void check_scale(const c10::optional<at::Tensor>& scale, const char* name, const char* weight, at::IntArrayRef shape) {
  TORCH_CHECK(scale.has_value(), "fused_experts: ", name, " must be given for ", weight, " weights (fp32 ", shape, ")");
  TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->sizes() == shape, "fused_experts: ", name, " must be fp32 ",
              shape, " for ", weight, " weights, got ", scale->scalar_type(), " ", scale->sizes());
}

// The scales of quantized experts (none for fp32/fp16/bf16 weights): int8 per output channel, w13_scale [E, 2I] and
// w2_scale [E, H], no block_shape; float8_e4m3fn per [bn, bk] block, w13_scale [E, ceil(2I / bn), ceil(H / bk)]
// and w2_scale [E, ceil(H / bn), ceil(I / bk)].
void check_quantization(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                        const c10::optional<at::Tensor>& w13_scale, const c10::optional<at::Tensor>& w2_scale,
                        at::OptionalIntArrayRef block_shape) {
  const at::ScalarType wtype = w13.scalar_type();
  const int64_t experts = w13.size(0), hidden_size = w13.size(2), inter2 = w13.size(1), inter = w2.size(2);
  if (wtype == hidden.scalar_type()) {
    TORCH_CHECK(!w13_scale.has_value() && !w2_scale.has_value() && !block_shape.has_value(),
                "fused_experts: w13_scale, w2_scale and block_shape are for float8_e4m3fn or int8 weights, got ",
                wtype, " weights with w13_scale ", w13_scale.has_value() ? "given" : "None", ", w2_scale ",
                w2_scale.has_value() ? "given" : "None", ", block_shape ", block_shape.has_value() ? "given" : "None");
    return;
  }
  if (wtype == at::kChar) {
    TORCH_CHECK(!block_shape.has_value(), "fused_experts: block_shape must be None for int8 weights (one scale per ",
                "output channel), got ", *block_shape);
    check_scale(w13_scale, "w13_scale", "int8", {experts, inter2});
    check_scale(w2_scale, "w2_scale", "int8", {experts, hidden_size});
    return;
  }
  TORCH_CHECK(block_shape.has_value(), "fused_experts: block_shape [bn, bk] must be given for float8_e4m3fn weights");
  TORCH_CHECK(block_shape->size() == 2 && (*block_shape)[0] >= 1 && (*block_shape)[1] >= 1,
              "fused_experts: block_shape must be [bn, bk] (both >= 1) for float8_e4m3fn weights, got ", *block_shape);
  const int64_t bn = (*block_shape)[0], bk = (*block_shape)[1];
  auto blocks = [](int64_t n, int64_t b) { return (n + b - 1) / b; };
  check_scale(w13_scale, "w13_scale", "float8_e4m3fn", {experts, blocks(inter2, bn), blocks(hidden_size, bk)});
  check_scale(w2_scale, "w2_scale", "float8_e4m3fn", {experts, blocks(hidden_size, bn), blocks(inter, bk)});
}

// Expert e's matrix of w [E, rows, cols] with its scales (see tiles::Matrix).
template <typename W>
tiles::Matrix<W> expert_matrix(const at::Tensor& w, int64_t e, const c10::optional<at::Tensor>& scale,
                               at::OptionalIntArrayRef block_shape) {
  tiles::Matrix<W> m{w.const_data_ptr<W>() + e * w.stride(0), w.stride(1), w.stride(2)};
  if (!scale.has_value()) return m;
  m.scale = scale->const_data_ptr<float>() + e * scale->stride(0);
  m.scale_row_stride = scale->stride(1);
  if (block_shape.has_value()) {
    m.bn = (*block_shape)[0];
    m.bk = (*block_shape)[1];
    m.scale_col_stride = scale->stride(2);
  } else {  // per output channel: one block spans a row
    m.bk = std::max<int64_t>(w.size(2), 1);
  }
  return m;
}

// Step 2 for expert e, intermediate columns n0 .. n0 + nb (nb <= kGateBlock). scratch: see kGateScratch.
template <typename T, typename W>
QF_VEC_INLINE void gate_up_item(const Work<T, W>& w, int64_t e, int64_t n0, int64_t nb, float* scratch) {
  const int64_t hidden = w.hidden, inter = w.inter, begin = w.start[e], end = w.start[e + 1];
  float* tile = scratch + 2 * kGateBlock * hidden;
  if (end - begin >= kOuterMinRows) {
    // Panels of 8 columns: gate rows n, then up rows I + n (padding rows -1), [H, 16] each; a tile's gate and up
    // come out as the two vectors of one row, ready for SwiGLU.
    const int64_t groups = (nb + vec::kLanes - 1) / vec::kLanes;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t rows[tiles::kPanelCols];
      for (int64_t c = 0; c < vec::kLanes; ++c) {
        const int64_t n = g * vec::kLanes + c;
        rows[c] = n < nb ? n0 + n : -1;
        rows[vec::kLanes + c] = n < nb ? inter + n0 + n : -1;
      }
      tiles::pack_panel(w.w13[e], rows, hidden, scratch + g * hidden * tiles::kPanelCols);
    }
    for (int64_t s0 = begin; s0 < end; s0 += tiles::kOuterRows) {
      const int64_t m = std::min(tiles::kOuterRows, end - s0);
      const float* x[tiles::kOuterRows];
      for (int64_t i = 0; i < m; ++i) x[i] = w.x + w.token[s0 + i] * w.ldx;
      for (int64_t g = 0; g < groups; ++g) {
        tiles::outer_rows(m, x, scratch + g * hidden * tiles::kPanelCols, hidden, tile);
        const int64_t count = std::min(vec::kLanes, nb - g * vec::kLanes);
        for (int64_t i = 0; i < m; ++i) {
          const float* row = tile + i * tiles::kPanelCols;
          store_act(w, s0 + i, n0 + g * vec::kLanes, vec::load(row), vec::load(row + vec::kLanes), count);
        }
      }
    }
    return;
  }
  float* gate_buf = tile;  // [kDotRows, kGateBlock] gate values, then up values
  float* up_buf = gate_buf + tiles::kDotRows * kGateBlock;
  int64_t ld_gate, ld_up;
  const float* gate_w = tiles::float_rows(w.w13[e], n0, nb, hidden, scratch, &ld_gate);
  const float* up_w = tiles::float_rows(w.w13[e], inter + n0, nb, hidden, scratch + kGateBlock * hidden, &ld_up);
  for (int64_t s0 = begin; s0 < end; s0 += tiles::kDotRows) {
    const int64_t m = std::min(tiles::kDotRows, end - s0);
    const float* x[tiles::kDotRows];
    for (int64_t i = 0; i < m; ++i) x[i] = w.x + w.token[s0 + i] * w.ldx;
    for (int64_t n = 0; n < nb; ++n) {
      const float* cols[2] = {gate_w + n * ld_gate, up_w + n * ld_up};
      tiles::dot_rows<2>(m, x, cols, hidden, gate_buf + n, kGateBlock, up_buf - gate_buf);
    }
    store_acts(w, s0, m, n0, nb, gate_buf, up_buf);
  }
}

// Step 3 for expert e, hidden columns h0 .. h0 + nb (nb <= kDownBlock). scratch: see kDownScratch.
template <typename T, typename W>
QF_VEC_INLINE void down_item(const Work<T, W>& w, int64_t e, int64_t h0, int64_t nb, float* scratch) {
  const int64_t inter = w.inter, begin = w.start[e], end = w.start[e + 1];
  float* tile = scratch + kDownBlock * inter;  // [rows, kDownBlock] or [kOuterRows, 16]
  if (end - begin >= kOuterMinRows) {
    const int64_t groups = (nb + tiles::kPanelCols - 1) / tiles::kPanelCols;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t rows[tiles::kPanelCols];
      for (int64_t c = 0; c < tiles::kPanelCols; ++c) {
        rows[c] = g * tiles::kPanelCols + c < nb ? h0 + g * tiles::kPanelCols + c : -1;
      }
      tiles::pack_panel(w.w2[e], rows, inter, scratch + g * inter * tiles::kPanelCols);
    }
    for (int64_t s0 = begin; s0 < end; s0 += tiles::kOuterRows) {
      const int64_t m = std::min(tiles::kOuterRows, end - s0);
      const float* a[tiles::kOuterRows];
      for (int64_t i = 0; i < m; ++i) a[i] = w.act + (s0 + i) * inter;
      for (int64_t g = 0; g < groups; ++g) {
        tiles::outer_rows(m, a, scratch + g * inter * tiles::kPanelCols, inter, tile);
        const int64_t c0 = g * tiles::kPanelCols;
        store_ys(w, s0, m, h0 + c0, std::min(tiles::kPanelCols, nb - c0), tile, tiles::kPanelCols);
      }
    }
    return;
  }
  int64_t ld;
  const float* down_w = tiles::float_rows(w.w2[e], h0, nb, inter, scratch, &ld);
  for (int64_t s0 = begin; s0 < end; s0 += tiles::kDotRows) {
    const int64_t m = std::min(tiles::kDotRows, end - s0);
    const float* a[tiles::kDotRows];
    for (int64_t i = 0; i < m; ++i) a[i] = w.act + (s0 + i) * inter;
    int64_t n = 0;
    for (; n + kDownTile <= nb; n += kDownTile) {
      const float* cols[kDownTile];
      for (int64_t j = 0; j < kDownTile; ++j) cols[j] = down_w + (n + j) * ld;
      tiles::dot_rows<kDownTile>(m, a, cols, inter, tile + n, kDownBlock, 1);
    }
    for (; n < nb; ++n) {
      const float* col = down_w + n * ld;
      tiles::dot_rows<1>(m, a, &col, inter, tile + n, kDownBlock, 1);
    }
    store_ys(w, s0, m, h0, nb, tile, kDownBlock);
  }
}

// Step 4 for token t.
template <typename T, typename W>
QF_VEC_INLINE void combine_token(const Work<T, W>& w, int64_t t) {
  const int64_t hidden = w.hidden, topk = w.topk;
  const float* y = w.y + t * topk * hidden;
  for (int64_t h = 0; h < hidden; h += vec::kLanes) {
    const int64_t n = std::min(vec::kLanes, hidden - h);
    vec::Vec acc = {};
    for (int64_t j = 0; j < topk; ++j) acc += vec::load_partial(y + j * hidden + h, n) * w.weight[t * topk + j];
    vec::store_as(w.out + t * hidden + h, acc, n);
  }
}

// Items lo .. hi of a stage. Gate/up and down items are numbered active-expert-major: item = a * blocks + block.
template <typename T, typename W>
QF_VEC_INLINE void run_stage_impl(const Work<T, W>& w, Stage stage, int64_t lo, int64_t hi) {
  if (stage == Stage::kCombine) {
    for (int64_t t = lo; t < hi; ++t) combine_token(w, t);
    return;
  }
  const int64_t block = stage == Stage::kGateUp ? kGateBlock : kDownBlock;
  const int64_t cols = stage == Stage::kGateUp ? w.inter : w.hidden;
  const int64_t blocks = (cols + block - 1) / block;
  // Weight panels of one item + one tile of results (gate_up_item, down_item).
  std::vector<float> scratch(stage == Stage::kGateUp ? 2 * kGateBlock * (w.hidden + tiles::kOuterRows)
                                                     : kDownBlock * (w.inter + tiles::kOuterRows));
  for (int64_t item = lo; item < hi; ++item) {
    const int64_t e = w.active[item / blocks], c0 = (item % blocks) * block, nb = std::min(block, cols - c0);
    const bool dot_form = w.start[e + 1] - w.start[e] < kOuterMinRows;
    if (stage == Stage::kGateUp) {
      if (!(dot_form && w.isa >= Isa::kAvx512 && avx512::gate_up_item(w, e, c0, nb))) {
        gate_up_item(w, e, c0, nb, scratch.data());
      }
    } else if (!(dot_form && w.isa >= Isa::kAvx512 && avx512::down_item(w, e, c0, nb))) {
      down_item(w, e, c0, nb, scratch.data());
    }
  }
}

// One non-template entry per (activation dtype, weight dtype), compiled for the baseline and for AVX2 + FMA
// (x86-64-v3); run_stage takes the one the call's instruction set allows (the AVX-512 tiles are items of their own,
// called from either).
#define QF_DEFINE_RUN_STAGE(T, W)                                                                     \
  void run_stage_baseline(const Work<T, W>& w, Stage stage, int64_t lo, int64_t hi) {                 \
    run_stage_impl(w, stage, lo, hi);                                                                 \
  }                                                                                                   \
  QF_TARGET_AVX2 void run_stage_avx2(const Work<T, W>& w, Stage stage, int64_t lo, int64_t hi) {      \
    run_stage_impl(w, stage, lo, hi);                                                                 \
  }                                                                                                   \
  void run_stage(const Work<T, W>& w, Stage stage, int64_t lo, int64_t hi) {                          \
    return w.isa >= Isa::kAvx2 ? run_stage_avx2(w, stage, lo, hi) : run_stage_baseline(w, stage, lo, hi); \
  }
#define QF_DEFINE_RUN_STAGES(T)                 \
  QF_DEFINE_RUN_STAGE(T, T)                     \
  QF_DEFINE_RUN_STAGE(T, c10::Float8_e4m3fn)    \
  QF_DEFINE_RUN_STAGE(T, int8_t)
QF_DEFINE_RUN_STAGES(float)
QF_DEFINE_RUN_STAGES(c10::BFloat16)
QF_DEFINE_RUN_STAGES(c10::Half)
#undef QF_DEFINE_RUN_STAGES
#undef QF_DEFINE_RUN_STAGE

// Runs a stage's items [0, n) over the threads in contiguous ranges of about equal cost, cost(item) = its
// expert's rows + kItemCost (item = a * blocks + block).
template <typename T, typename W>
void run_items(const Work<T, W>& w, Stage stage, const std::vector<int64_t>& active, int64_t blocks) {
  const int64_t n = static_cast<int64_t>(active.size()) * blocks;
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t item = 0; item < n; ++item) {
    const int64_t e = active[item / blocks];
    prefix[item + 1] = prefix[item] + (w.start[e + 1] - w.start[e]) + kItemCost;
  }
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1) return run_stage(w, stage, 0, n);
  const int64_t total = prefix[n];
  auto first_item = [&](int64_t part) {  // the first item whose cost begins at or after part / threads of total
    return std::lower_bound(prefix.begin(), prefix.begin() + n, (total * part + threads - 1) / threads) -
           prefix.begin();
  };
  at::parallel_for(0, threads, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) run_stage(w, stage, first_item(part), first_item(part + 1));
  });
}

}  // namespace

at::Tensor fused_experts_cpu(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2,
                             const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                             const c10::optional<at::Tensor>& expert_map, c10::string_view activation,
                             const c10::optional<at::Tensor>& w13_scale, const c10::optional<at::Tensor>& w2_scale,
                             at::OptionalIntArrayRef block_shape) {
  check_fused_experts(hidden_states, w13, w2, topk_weights, topk_ids);
  check_quantization(hidden_states, w13, w2, w13_scale, w2_scale, block_shape);
  TORCH_CHECK(activation == "silu" || activation == "gelu", "fused_experts: activation must be 'silu' or 'gelu', got '",
              std::string(activation), "'");
  TORCH_CHECK(!expert_map.has_value() || (expert_map->dim() == 1 && expert_map->scalar_type() == at::kInt),
              "fused_experts: expert_map must be int32 [global E]");
  const int64_t num_tokens = topk_ids.size(0), topk = topk_ids.size(1);
  const int64_t num_experts = w13.size(0), hidden = w13.size(2), inter = w2.size(2);
  const int64_t num_pairs = num_tokens * topk;
  at::Tensor out = at::empty({num_tokens, hidden}, hidden_states.options());
  if (num_pairs == 0) return out.zero_();

  // 1. Counting sort of the pairs by expert.
  // Local expert ids: expert_map[global id] under expert parallelism (-1: another rank's expert).
  const at::Tensor flat = topk_ids.to(at::kLong).contiguous().view({-1});
  const at::Tensor ids = expert_map.has_value() ? expert_map->index_select(0, flat).to(at::kLong) : flat;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> start(num_experts + 1, 0);
  int64_t skipped = 0;
  for (int64_t i = 0; i < num_pairs; ++i) {
    TORCH_CHECK(id[i] >= -1 && id[i] < num_experts, "fused_experts: topk_ids must lie in [-1, ", num_experts,
                ") (-1: an expert of another rank), got ", id[i], " at flat index ", i);
    if (id[i] < 0) {
      ++skipped;
      continue;
    }
    ++start[id[i] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) start[e + 1] += start[e];
  const int64_t routed = num_pairs - skipped;
  std::vector<int64_t> pair(routed), token(routed), fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < num_pairs; ++i) {
    if (id[i] < 0) continue;
    const int64_t s = fill[id[i]]++;
    pair[s] = i;
    token[s] = i / topk;
  }
  std::vector<int64_t> active;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (start[e + 1] > start[e]) active.push_back(e);
  }

  const Isa isa = cpu_isa();
  const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
  const bool x_in_place = hidden_states.scalar_type() == at::kFloat && hidden_states.stride(1) == 1;
  const at::Tensor x32 = x_in_place ? hidden_states : hidden_states.to(at::kFloat).contiguous();
  at::Tensor act = at::empty({routed, inter}, out.options().dtype(at::kFloat));
  // A skipped pair's row of y is never computed: zero, so that it adds nothing to the combine.
  at::Tensor y = skipped > 0 ? at::zeros({num_pairs, hidden}, act.options()) : at::empty({num_pairs, hidden}, act.options());
  AT_DISPATCH_V2(hidden_states.scalar_type(), "fused_experts_cpu", AT_WRAP([&] {
    auto run = [&](auto weight_tag) {
      using W = decltype(weight_tag);
      std::vector<tiles::Matrix<W>> up(num_experts), down(num_experts);
      for (int64_t e = 0; e < num_experts; ++e) {
        up[e] = expert_matrix<W>(w13, e, w13_scale, block_shape);
        down[e] = expert_matrix<W>(w2, e, w2_scale, block_shape);
      }
      const bool bf16_dot = std::is_same_v<W, c10::BFloat16> && isa >= Isa::kAvx512Bf16;
      at::Tensor xb, actb;
      if (bf16_dot) {
        xb = hidden_states.stride(1) == 1 ? hidden_states : hidden_states.contiguous();
        actb = at::empty({routed, inter}, act.options().dtype(at::kBFloat16));
      }
      const Work<scalar_t, W> work{up.data(), down.data(), hidden, inter, topk, num_experts, x32.const_data_ptr<float>(),
                                   x32.stride(0), start.data(), pair.data(), token.data(), active.data(),
                                   weights.const_data_ptr<float>(), act.mutable_data_ptr<float>(),
                                   y.mutable_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), activation == "gelu",
                                   isa, bf16_dot ? xb.const_data_ptr<c10::BFloat16>() : nullptr,
                                   bf16_dot ? xb.stride(0) : 0,
                                   bf16_dot ? actb.mutable_data_ptr<c10::BFloat16>() : nullptr};
      run_items(work, Stage::kGateUp, active, (inter + kGateBlock - 1) / kGateBlock);  // 2.
      run_items(work, Stage::kDown, active, (hidden + kDownBlock - 1) / kDownBlock);  // 3.
      at::parallel_for(0, num_tokens, 16, [&](int64_t lo, int64_t hi) { run_stage(work, Stage::kCombine, lo, hi); });
    };
    if (w13.scalar_type() == at::kFloat8_e4m3fn) {
      run(c10::Float8_e4m3fn());
    } else if (w13.scalar_type() == at::kChar) {
      run(int8_t());
    } else {
      run(scalar_t());
    }
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

TORCH_LIBRARY_IMPL(qwen_fast, CPU, m) { m.impl("fused_experts", &fused_experts_cpu); }

}  // namespace qwen_fast
