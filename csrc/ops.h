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

// GQA flash attention over packed sequences: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens int32 [B + 1];
// window edges -1 = unbounded, causal aligned bottom-right (qwen_fast/reference/attention.py). Returns [Tq, Hq, D].
at::Tensor flash_attn_varlen_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, double softmax_scale, bool causal, int64_t window_left,
                                 int64_t window_right);

}  // namespace qwen_fast
