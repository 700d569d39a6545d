// Host functions of qwen_fast._C. Schemas: torch_bindings.cpp. Implementations: cpu/ and cuda/, registered per
// dispatch key next to their code.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace qwen_fast {

// Writes key/value [N, Hkv, D] into the paged caches [num_blocks, block_size, Hkv, D] at slot_mapping [N] (int64);
// a negative slot is skipped.
void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping);
void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping);

// Sorts the flat ids of topk_ids [T, k] (int32/int64) by expert, runs padded to block_size (layout:
// qwen_fast/reference/moe_align.py) -> (sorted_token_ids, expert_ids, num_tokens_post_padded), all int32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cpu(const at::Tensor& topk_ids,
                                                                         int64_t block_size, int64_t num_experts);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(const at::Tensor& topk_ids,
                                                                          int64_t block_size, int64_t num_experts);

// SwiGLU experts: hidden_states [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], topk_weights and
// topk_ids [T, k]; returns [T, H], the k expert outputs weighted and summed in fp32 in j order.
at::Tensor fused_experts_cpu(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2,
                             const at::Tensor& topk_weights, const at::Tensor& topk_ids);

// RoPE of query [T, Hq, D] and key [T, Hkv, D] by positions [T] (int64) with cos_sin_cache [max_position, D]
// ([cos | sin], fp32 or query's dtype) -> new (query, key). Roundings: rope.h.
std::tuple<at::Tensor, at::Tensor> rotary_embedding_cpu(const at::Tensor& positions, const at::Tensor& query,
                                                        const at::Tensor& key, const at::Tensor& cos_sin_cache,
                                                        bool is_neox);
std::tuple<at::Tensor, at::Tensor> rotary_embedding_cuda(const at::Tensor& positions, const at::Tensor& query,
                                                         const at::Tensor& key, const at::Tensor& cos_sin_cache,
                                                         bool is_neox);

// Per-head RMSNorm of query and key (weights [D]), RoPE, rotated key and value written into the paged caches at
// slot_mapping [T] (int64, negative = skip) -> new (query, key). Roundings: rope.h.
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_and_cache_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& q_norm_weight,
    const at::Tensor& k_norm_weight, double eps, const at::Tensor& positions, const at::Tensor& cos_sin_cache,
    at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping, bool is_neox);
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_and_cache_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& q_norm_weight,
    const at::Tensor& k_norm_weight, double eps, const at::Tensor& positions, const at::Tensor& cos_sin_cache,
    at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping, bool is_neox);

}  // namespace qwen_fast
