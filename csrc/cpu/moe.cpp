// CPU fused_experts: SwiGLU experts over the (token, choice) pairs grouped by expert, with ATen GEMMs, and the
// weighted fp32 combine over the k choices in j order.
//
// 1. Counting sort of the flat pairs i = t * k + j by expert (stable: ascending i within an expert), serial, O(T*k).
// 2. Per expert e with pairs (parallel over experts when there are at least as many active experts as threads;
//    otherwise serial over experts, so that each GEMM gets every thread): gather the pairs' token rows of
//    hidden_states, gate_up = x @ w13[e].T ([rows, 2I], w13 read in place as a transposed view), SwiGLU in one pass
//    writing act [rows, I] (gate and up as the GEMM rounded them, silu in fp32 rounded to the dtype, the product in
//    fp32 rounded to the dtype: the reference's roundings), y_e = act @ w2[e].T, each row copied to y[i] ([T*k, H]).
//    Every row of y is written by exactly one expert.
// 3. Combine, parallel over tokens: out[t] = sum_{j=0..k-1} float(w[t, j]) * float(y[t*k + j]) in an fp32 row
//    accumulator, j ascending, then one cast. Deterministic: the same order for every run and thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../ops.h"

namespace qwen_fast {
namespace {

void check_fused_experts(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& topk_weights, const at::Tensor& topk_ids) {
  TORCH_CHECK(hidden.dim() == 2, "fused_experts: hidden_states must be [T, H], got ", hidden.sizes());
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, "fused_experts: w13 must be [E, 2I, H] and w2 [E, H, I], got ",
              w13.sizes(), " and ", w2.sizes());
  TORCH_CHECK(w13.size(2) == hidden.size(1) && w13.size(1) % 2 == 0 && w13.size(1) > 0,
              "fused_experts: w13 [E, 2I, H] = ", w13.sizes(), " does not fit hidden_states [T, H] = ", hidden.sizes());
  TORCH_CHECK(w2.size(0) == w13.size(0) && w2.size(1) == w13.size(2) && 2 * w2.size(2) == w13.size(1),
              "fused_experts: w2 must be [E, H, I] for w13 [E, 2I, H] = ", w13.sizes(), ", got ", w2.sizes());
  TORCH_CHECK(w13.scalar_type() == hidden.scalar_type() && w2.scalar_type() == hidden.scalar_type(),
              "fused_experts: w13 and w2 must have hidden_states' dtype ", hidden.scalar_type(), ", got ",
              w13.scalar_type(), " and ", w2.scalar_type());
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == hidden.size(0),
              "fused_experts: topk_ids must be [T, k] with T = ", hidden.size(0), ", got ", topk_ids.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "fused_experts: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() && at::isFloatingType(topk_weights.scalar_type()),
              "fused_experts: topk_weights must be float [T, k] = ", topk_ids.sizes(), ", got ",
              topk_weights.scalar_type(), " ", topk_weights.sizes());
}

// act[r, c] = round(round(silu(gate[r, c])) * up[r, c]) with gate = gate_up[r, c], up = gate_up[r, I + c].
template <typename scalar_t>
void swiglu_rows(const scalar_t* gate_up, scalar_t* act, int64_t rows, int64_t inter) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* gate = gate_up + r * 2 * inter;
    const scalar_t* up = gate + inter;
    scalar_t* out = act + r * inter;
    for (int64_t c = 0; c < inter; ++c) {
      const float g = static_cast<float>(gate[c]);
      const float silu = static_cast<float>(static_cast<scalar_t>(g / (1.0f + std::exp(-g))));
      out[c] = static_cast<scalar_t>(silu * static_cast<float>(up[c]));
    }
  }
}

}  // namespace

at::Tensor fused_experts_cpu(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2,
                             const at::Tensor& topk_weights, const at::Tensor& topk_ids) {
  check_fused_experts(hidden_states, w13, w2, topk_weights, topk_ids);
  const int64_t num_tokens = topk_ids.size(0), topk = topk_ids.size(1);
  const int64_t num_experts = w13.size(0), hidden = w13.size(2), inter = w2.size(2);
  const int64_t num_pairs = num_tokens * topk;
  at::Tensor out = at::empty({num_tokens, hidden}, hidden_states.options());
  if (num_pairs == 0) return out.zero_();

  // 1. Counting sort of the pairs by expert.
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> start(num_experts + 1, 0);
  for (int64_t i = 0; i < num_pairs; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < num_experts, "fused_experts: topk_ids must lie in [0, ", num_experts,
                "), got ", id[i], " at flat index ", i);
    ++start[id[i] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) start[e + 1] += start[e];
  at::Tensor order = at::empty({num_pairs}, ids.options());
  int64_t* pair = order.mutable_data_ptr<int64_t>();
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < num_pairs; ++i) pair[fill[id[i]]++] = i;
  const at::Tensor tokens = at::floor_divide(order, topk);
  std::vector<int64_t> active;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (start[e + 1] > start[e]) active.push_back(e);
  }

  // 2. The experts' GEMMs, rows of y written at the pairs' flat indices.
  at::Tensor y = at::empty({num_pairs, hidden}, hidden_states.options());
  const int64_t row_bytes = hidden * y.element_size();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden_states.scalar_type(), "fused_experts_cpu", [&] {
    auto run_expert = [&](int64_t e) {
      const int64_t begin = start[e], rows = start[e + 1] - start[e];
      const at::Tensor x = hidden_states.index_select(0, tokens.narrow(0, begin, rows));
      const at::Tensor gate_up = at::mm(x, w13.select(0, e).t()).contiguous();
      at::Tensor act = at::empty({rows, inter}, hidden_states.options());
      swiglu_rows(gate_up.const_data_ptr<scalar_t>(), act.mutable_data_ptr<scalar_t>(), rows, inter);
      const at::Tensor expert_out = at::mm(act, w2.select(0, e).t()).contiguous();
      const char* src = static_cast<const char*>(expert_out.const_data_ptr());
      char* dst = static_cast<char*>(y.mutable_data_ptr());
      for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + pair[begin + r] * row_bytes, src + r * row_bytes, row_bytes);
    };
    const int64_t num_active = static_cast<int64_t>(active.size());
    if (num_active >= at::get_num_threads()) {
      at::parallel_for(0, num_active, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t a = lo; a < hi; ++a) run_expert(active[a]);
      });
    } else {
      for (const int64_t e : active) run_expert(e);
    }

    // 3. Weighted combine in fp32, j ascending.
    const at::Tensor weights = topk_weights.to(at::kFloat).contiguous();
    const float* w = weights.const_data_ptr<float>();
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> acc(hidden);
      for (int64_t t = lo; t < hi; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < topk; ++j) {
          const float weight = w[t * topk + j];
          const scalar_t* row = y_data + (t * topk + j) * hidden;
          for (int64_t h = 0; h < hidden; ++h) acc[h] += weight * static_cast<float>(row[h]);
        }
        for (int64_t h = 0; h < hidden; ++h) out_data[t * hidden + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(qwen_fast, CPU, m) { m.impl("fused_experts", &fused_experts_cpu); }

}  // namespace qwen_fast
