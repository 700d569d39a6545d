// Host functions of qwen_fast._C. Schemas: torch_bindings.cpp. Implementations: cpu/ and cuda/, registered per
// dispatch key next to their code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace qwen_fast {

// Writes key/value [N, Hkv, D] into the paged caches [num_blocks, block_size, Hkv, D] at slot_mapping [N] (int64);
// a negative slot is skipped. With k_scale/v_scale (fp32, one element) the caches are float8_e4m3fn (x / scale).
void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping,
                           const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale);
void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping,
                            const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale);

// Top-k routing of gating_output [T, E] (fp32/fp16/bf16; math: qwen_fast/reference/routing.py) ->
// (topk_weights fp32 [T, k], topk_ids int32 [T, k]).
std::tuple<at::Tensor, at::Tensor> fused_topk_cpu(const at::Tensor& gating_output, int64_t topk, bool renormalize,
                                                  c10::string_view scoring_func,
                                                  const c10::optional<at::Tensor>& e_score_correction_bias,
                                                  c10::optional<int64_t> num_expert_group,
                                                  c10::optional<int64_t> topk_group, double routed_scaling_factor,
    c10::string_view group_scoring);
std::tuple<at::Tensor, at::Tensor> fused_topk_cuda(const at::Tensor& gating_output, int64_t topk, bool renormalize,
                                                   c10::string_view scoring_func,
                                                   const c10::optional<at::Tensor>& e_score_correction_bias,
                                                   c10::optional<int64_t> num_expert_group,
                                                   c10::optional<int64_t> topk_group, double routed_scaling_factor,
    c10::string_view group_scoring);

// Sorts the flat ids of topk_ids [T, k] (int32/int64) by expert, runs padded to block_size (layout:
// qwen_fast/reference/moe_align.py) -> (sorted_token_ids, expert_ids, num_tokens_post_padded), all int32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cpu(const at::Tensor& topk_ids,
                                                                         int64_t block_size, int64_t num_experts);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(const at::Tensor& topk_ids,
                                                                          int64_t block_size, int64_t num_experts);

// SwiGLU (activation "silu") or GeGLU ("gelu") experts: hidden_states [T, H], w13 [E, 2I, H] (gate rows, then up
// rows), w2 [E, H, I], topk_weights and topk_ids [T, k] (global ids mapped by expert_map [global E] int32 when
// given, -1: skipped); returns [T, H], the k expert outputs weighted and summed in fp32 in j order. Weights in
// hidden_states' dtype, or quantized (read in place, dequantized in registers or in a per-item tile): int8 with fp32
// w13_scale [E, 2I] / w2_scale [E, H] per output channel (W[e, n, k] = w[e, n, k] * scale[e, n]); float8_e4m3fn
// with block_shape [bn, bk] and fp32 w13_scale [E, ceil(2I / bn), ceil(H / bk)] / w2_scale [E, ceil(H / bn),
// ceil(I / bk)] (W[e, n, k] = w[e, n, k] * scale[e, n / bn, k / bk]).
at::Tensor fused_experts_cpu(const at::Tensor& hidden_states, const at::Tensor& w13, const at::Tensor& w2,
                             const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                             const c10::optional<at::Tensor>& expert_map, c10::string_view activation,
                             const c10::optional<at::Tensor>& w13_scale, const c10::optional<at::Tensor>& w2_scale,
                             at::OptionalIntArrayRef block_shape);

// input [*, K] . weight [N, K]^T (+ bias [N]) -> [*, N], all in one dtype (fp32/bf16/fp16), fp32 accumulation and
// one rounding (qwen_fast/reference/linear.py); weights read in place. The decode projections' kernel (M <= 16).
at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

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

// Writes the new k/v [B, Sq_new, Hkv, D] (if given) at positions cache_seqlens[b] + i (int32 [B]) of the paged cache
// [num_blocks, block_size, Hkv, D] (pages listed by block_table int32 [B, max_blocks]), then attends q [B, Sq, Hq, D]
// over positions [cache_leftpad[b] (default 0), cache_seqlens[b] + Sq_new); bottom-right aligned window (window_right
// = 0 is causal, -1 unbounded); softcap > 0 caps the scores; num_splits > 0 forces the context split. Returns
// (out [B, Sq, Hq, D], 0 for a row with no visible key; lse fp32 [B, Hq, Sq], +inf for such a row). With k_descale /
// v_descale (fp32 [B, Hkv]) the caches are float8_e4m3fn, read as fp8 * descale (no append then).
std::tuple<at::Tensor, at::Tensor> flash_attn_with_kvcache_cpu(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cache_seqlens, const at::Tensor& block_table,
    const std::optional<at::Tensor>& cache_leftpad, double softmax_scale, int64_t window_left, int64_t window_right,
    double softcap, int64_t num_splits, const std::optional<at::Tensor>& k_descale,
    const std::optional<at::Tensor>& v_descale);

// GQA flash attention over packed sequences: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens int32 [B + 1];
// window edges -1 = unbounded, causal aligned bottom-right, softcap 0 = off (qwen_fast/reference/attention.py).
// Returns (out [Tq, Hq, D], softmax_lse fp32 [Hq, Tq], +inf for a row with no visible key; empty [0] unless
// return_lse).
std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                         int64_t max_seqlen_k, double softmax_scale, bool causal,
                                                         int64_t window_left, int64_t window_right, double softcap,
                                                         bool return_lse);

}  // namespace qwen_fast
