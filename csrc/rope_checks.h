// Host side of rotary_embedding and qk_norm_rope_and_cache, shared by the CPU and CUDA implementations: the argument
// checks (they build the RopeLayout the kernels read) and the dtype dispatch that builds the kernels' RopeArgs. The Python functional API checks first with friendlier
// messages; these guard direct torch.ops.qwen_fast calls. Positions and slots are checked against their ranges by
// the CPU kernel (the CUDA kernel would need a host sync).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "rope.h"

namespace qwen_fast {

inline void check_rope_row(const char* op, const char* name, const at::Tensor& x, int64_t num_tokens,
                           int64_t head_dim, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == num_tokens && x.size(2) == head_dim, op, ": ", name, " must be [T=",
              num_tokens, ", H, D=", head_dim, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.stride(2) == 1 || head_dim <= 1, op, ": the head_dim of ", name, " must be contiguous");
}

// Checks positions, query, key and the cos/sin table; returns the layout of query and key (outputs contiguous).
inline RopeLayout check_rotary(const char* op, const at::Tensor& positions, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& cos_sin_cache, bool is_neox) {
  TORCH_CHECK(query.dim() == 3, op, ": query must be [T, Hq, D], got ", query.sizes());
  const int64_t num_tokens = query.size(0), head_dim = query.size(2);
  TORCH_CHECK(head_dim % 2 == 0, op, ": head_dim must be even, got ", head_dim);
  check_rope_row(op, "query", query, num_tokens, head_dim, query.scalar_type());
  check_rope_row(op, "key", key, num_tokens, head_dim, query.scalar_type());
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == num_tokens, op,
              ": positions must be int64 [T=", num_tokens, "], got ", positions.scalar_type(), " ", positions.sizes());
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim, op,
              ": cos_sin_cache must be [max_position, D=", head_dim, "], got ", cos_sin_cache.sizes());
  TORCH_CHECK(cos_sin_cache.stride(1) == 1 || head_dim <= 1, op, ": the rows of cos_sin_cache must be contiguous, got "
              "strides ", cos_sin_cache.strides());
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat || cos_sin_cache.scalar_type() == query.scalar_type(), op,
              ": cos_sin_cache must be float32 or query's dtype ", query.scalar_type(), ", got ",
              cos_sin_cache.scalar_type());
  RopeLayout l{};
  l.positions_stride = positions.stride(0);
  l.cos_sin_stride = cos_sin_cache.stride(0);
  l.q_token_stride = query.stride(0);
  l.q_head_stride = query.stride(1);
  l.k_token_stride = key.stride(0);
  l.k_head_stride = key.stride(1);
  l.qo_token_stride = query.size(1) * head_dim;
  l.ko_token_stride = key.size(1) * head_dim;
  l.num_q_heads = query.size(1);
  l.num_kv_heads = key.size(1);
  l.head_dim = head_dim;
  l.is_neox = is_neox;
  return l;
}

// Adds the fused op's value, weights, caches and slots to the rotary checks.
inline RopeLayout check_qk_norm_rope_and_cache(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                               const at::Tensor& q_norm_weight, const at::Tensor& k_norm_weight,
                                               double eps, const at::Tensor& positions,
                                               const at::Tensor& cos_sin_cache, const at::Tensor& key_cache,
                                               const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                                               bool is_neox) {
  const char* op = "qk_norm_rope_and_cache";
  RopeLayout l = check_rotary(op, positions, query, key, cos_sin_cache, is_neox);
  const int64_t num_tokens = query.size(0), head_dim = l.head_dim;
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value must have key's shape ", key.sizes(), ", got ",
              value.sizes());
  check_rope_row(op, "value", value, num_tokens, head_dim, query.scalar_type());
  for (const at::Tensor* weight : {&q_norm_weight, &k_norm_weight}) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == head_dim && weight->is_contiguous() &&
                    weight->scalar_type() == query.scalar_type(),
                op, ": the norm weights must be contiguous [D=", head_dim, "] in query's dtype, got ",
                weight->sizes(), " ", weight->scalar_type());
  }
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(2) == key.size(1) && key_cache.size(3) == head_dim, op,
              ": key_cache must be [num_blocks, block_size, Hkv=", key.size(1), ", D=", head_dim, "], got ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes() && value_cache.strides() == key_cache.strides(), op,
              ": value_cache must have key_cache's shape and strides, got ", value_cache.sizes());
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() && value_cache.scalar_type() == query.scalar_type(),
              op, ": the caches must be in query's dtype ", query.scalar_type(), ", got ", key_cache.scalar_type());
  TORCH_CHECK(key_cache.stride(3) == 1, op, ": the head_dim of the caches must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == num_tokens,
              op, ": slot_mapping must be int64 [T=", num_tokens, "], got ", slot_mapping.scalar_type(), " ",
              slot_mapping.sizes());
  l.slot_stride = slot_mapping.stride(0);
  l.v_token_stride = value.stride(0);
  l.v_head_stride = value.stride(1);
  l.block_stride = key_cache.stride(0);
  l.page_stride = key_cache.stride(1);
  l.cache_head_stride = key_cache.stride(2);
  l.block_size = key_cache.size(1);
  l.eps = static_cast<float>(eps);
  return l;
}

// The optional tensors of the fused op (all null for rotary_embedding).
struct RopeExtras {
  const at::Tensor* value = nullptr;
  const at::Tensor* q_norm_weight = nullptr;
  const at::Tensor* k_norm_weight = nullptr;
  at::Tensor* key_cache = nullptr;
  at::Tensor* value_cache = nullptr;
  const at::Tensor* slot_mapping = nullptr;
};

// Allocates the outputs and calls launch(RopeArgs<Scalar, Cache>) for query's dtype and the table's (fp32 -> Cache =
// float, else Cache = Scalar). Returns (query_out, key_out).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> with_rope_args(const at::Tensor& positions, const at::Tensor& query,
                                                  const at::Tensor& key, const at::Tensor& cos_sin,
                                                  const RopeExtras& e, Launch&& launch) {
  at::Tensor query_out = at::empty(query.sizes(), query.options());
  at::Tensor key_out = at::empty(key.sizes(), key.options());
  auto per_dtype = [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    auto ptr = [](const at::Tensor* t) { return t == nullptr ? nullptr : t->const_data_ptr<scalar_t>(); };
    auto mut = [](at::Tensor* t) { return t == nullptr ? nullptr : t->mutable_data_ptr<scalar_t>(); };
    auto go = [&](auto cache_tag) {
      using Cache = decltype(cache_tag);
      launch(RopeArgs<scalar_t, Cache>{
          positions.const_data_ptr<int64_t>(), query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
          ptr(e.value), ptr(e.q_norm_weight), ptr(e.k_norm_weight), cos_sin.const_data_ptr<Cache>(),
          query_out.mutable_data_ptr<scalar_t>(), key_out.mutable_data_ptr<scalar_t>(), mut(e.key_cache),
          mut(e.value_cache), e.slot_mapping == nullptr ? nullptr : e.slot_mapping->const_data_ptr<int64_t>()});
    };
    if (cos_sin.scalar_type() == at::kFloat) {
      go(float{});
    } else {
      go(scalar_t{});
    }
  };
  // float, half and bfloat16 only (the Python API admits no other dtype): no unused double kernels.
  AT_DISPATCH_SWITCH(query.scalar_type(), "qwen_fast_rope",
                     AT_DISPATCH_CASE(at::kFloat, [&] { per_dtype(scalar_t{}); })
                         AT_DISPATCH_CASE(at::kHalf, [&] { per_dtype(scalar_t{}); })
                             AT_DISPATCH_CASE(at::kBFloat16, [&] { per_dtype(scalar_t{}); }));
  return {query_out, key_out};
}

}  // namespace qwen_fast
