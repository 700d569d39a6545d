// CPU flash_attn_with_kvcache over a paged cache (a contiguous cache comes as B pages of S_max rows with block table
// [[0], [1], ...]). First the new k/v, if given, are written at positions cache_seqlens[b] + i by reshape_and_cache's
// CPU kernel (after every used block_table entry has been checked); then the queries attend over the cache:
//
// Work item (b, g, s): sequence b, KV head g, context split s. Its Sq * G query rows (G = Hq / Hkv; row r is query
// r / G of head g * G + r % G) are processed together, so each K/V row is read and converted to fp32 once per group.
// The keys the rows can see, [lo, hi) (bottom-right aligned causal/window bounds, see reference/attention.py), are cut
// into `splits` equal slices; the slice is walked in tiles of kTile positions, each position's page found through the
// block table (position p: page block_table[b, p / block_size], row p % block_size), so any block_size works. Per
// tile: K and V rows converted to fp32 (fp16/bf16) or read in place (fp32), scores [rows, kTile] by vectorised dot
// products of the pre-scaled fp32 queries, then per row the online softmax (Milakov & Gimelshein 2018): new max,
// rescale of the fp32 accumulator, exp weights, accumulator += p * v. Invisible keys are skipped.
// Keys before cache_leftpad[b] are invisible to every row. softcap > 0 caps each score: the queries are pre-scaled by
// scale / softcap and the dot product p becomes softcap * tanh(p) (flash-attn: scale first, then cap).
// Parallel over (b, g, s) with at::parallel_for. splits = num_splits when > 0; else 1 when B * Hkv fills the threads,
// otherwise each sequence's range is split so that every thread has work. A second pass merges the slices'
// normalised outputs with their log-sum-exp weights and writes the row's natural log-sum-exp to lse [B, Hq, Sq].
// A row with no visible key writes 0 and lse +inf (flash-attn's value). fp8 caches (float8_e4m3fn, with k_descale and
// v_descale fp32 [B, Hkv]): each K/V row is converted to fp32 times its (sequence, KV head) descale as it is loaded.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../ops.h"
#include "vec.h"

namespace qwen_fast {
namespace {

using vec::kLanes;
constexpr int64_t kTile = 32;            // keys per tile: K and V tiles of 32 x D fp32 stay in L1 for D <= 128
constexpr int64_t kMinSplitKeys = 256;   // below this a split costs more in its merge than it saves
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Two independent accumulators hide the FMA latency (vec.h: 8-lane vectors, AVX2 + FMA in the clone that runs).
QF_VEC_INLINE float dot(const float* a, const float* b, int64_t n) {
  vec::Vec acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 += vec::load(a + i) * vec::load(b + i);
    acc1 += vec::load(a + i + kLanes) * vec::load(b + i + kLanes);
  }
  for (; i + kLanes <= n; i += kLanes) acc0 += vec::load(a + i) * vec::load(b + i);
  float sum = vec::hsum(acc0 + acc1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y = y * scale + p * x
QF_VEC_INLINE void scale_axpy(float* y, float scale, float p, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vec::store(y + i, vec::load(y + i) * scale + p * vec::load(x + i));
  for (; i < n; ++i) y[i] = y[i] * scale + p * x[i];
}

// The tile update below is compiled for AVX2 + FMA and for the baseline x86-64, picked when the library loads
// (QF_CPU_CLONES, vec.h): the extension is built without -mavx2.
// One tile of n keys (fp32 rows keys[j], values[j], positions tile + j) for every query row of a group: row r sees
// positions [lower[r], upper[r]); its scores, online-softmax max / sum and accumulator acc[r] [D] are updated.
QF_CPU_CLONES void attend_tile(const float* q, int64_t rows, int64_t d, const float* const* keys,
                               const float* const* values, int64_t n, int64_t tile, const int64_t* lower,
                               const int64_t* upper, float softcap, float* scores, float* row_max, float* row_sum,
                               float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first = std::max<int64_t>(lower[r] - tile, 0), last = std::min<int64_t>(upper[r] - tile, n);
    if (first >= last) continue;
    float* score = scores + r * kTile;
    float tile_max = kNegInf;
    for (int64_t j = first; j < last; ++j) {
      score[j] = dot(q + r * d, keys[j], d);
      if (softcap > 0.0f) score[j] = softcap * std::tanh(score[j]);
      tile_max = std::max(tile_max, score[j]);
    }
    const float new_max = std::max(row_max[r], tile_max);
    const float alpha = std::exp(row_max[r] - new_max);  // 0 when the row had no key yet
    float* out = acc + r * d;
    float sum = row_sum[r] * alpha;
    for (int64_t j = first; j < last; ++j) {
      const float weight = std::exp(score[j] - new_max);
      sum += weight;
      scale_axpy(out, j == first ? alpha : 1.0f, weight, values[j], d);
    }
    row_sum[r] = sum;
    row_max[r] = new_max;
  }
}

struct Problem {
  int64_t batch, seqlen_q, heads_kv, group, head_dim, block_size, table_width;
  int64_t window_left, window_right;  // -1: unbounded; causal is window_right = 0
  float scale, softcap;                // softcap 0: off
};

void check_kvcache_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& seqlens, const at::Tensor& block_table,
                           const std::optional<at::Tensor>& k_descale, const std::optional<at::Tensor>& v_descale) {
  const bool fp8 = k_descale.has_value();
  TORCH_CHECK(fp8 == v_descale.has_value(), "flash_attn_with_kvcache: k_descale and v_descale go together");
  for (const std::optional<at::Tensor>* descale : {&k_descale, &v_descale}) {
    TORCH_CHECK(!descale->has_value() || ((*descale)->scalar_type() == at::kFloat && (*descale)->dim() == 2 &&
                                          (*descale)->size(0) == q.size(0) && (*descale)->size(1) == k_cache.size(2)),
                "flash_attn_with_kvcache: k_descale and v_descale must be fp32 [B, Hkv]");
  }
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4, "flash_attn_with_kvcache: q must be [B, Sq, Hq, D] and k_cache ",
              "[num_blocks, block_size, Hkv, D], got ", q.sizes(), " and ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "flash_attn_with_kvcache: v_cache must have k_cache's shape ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  const at::ScalarType cache_type = fp8 ? at::kFloat8_e4m3fn : q.scalar_type();
  TORCH_CHECK(k_cache.scalar_type() == cache_type && v_cache.scalar_type() == cache_type,
              "flash_attn_with_kvcache: k_cache and v_cache must be ", cache_type, " (q's dtype, or float8_e4m3fn ",
              "with descales), got ", k_cache.scalar_type(), " and ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.size(3) == q.size(3) && k_cache.size(2) > 0 && q.size(2) % k_cache.size(2) == 0,
              "flash_attn_with_kvcache: q [B, Sq, Hq, D] = ", q.sizes(), " does not fit k_cache [.., Hkv, D] = ",
              k_cache.sizes(), " (Hq must be a multiple of Hkv, one head dim)");
  TORCH_CHECK(q.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "flash_attn_with_kvcache: q, k_cache and v_cache must be contiguous in the head dim");
  TORCH_CHECK(seqlens.scalar_type() == at::kInt && seqlens.dim() == 1 && seqlens.size(0) == q.size(0),
              "flash_attn_with_kvcache: cache_seqlens must be int32 [B] with B = ", q.size(0), ", got ",
              seqlens.scalar_type(), " ", seqlens.sizes());
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == q.size(0),
              "flash_attn_with_kvcache: block_table must be int32 [B, max_blocks] with B = ", q.size(0), ", got ",
              block_table.scalar_type(), " ", block_table.sizes());
}

// Checks that every used position of every sequence maps to a page of the pool; returns the longest sequence.
int64_t check_lengths(const int32_t* length, const int32_t* leftpad, const int32_t* table, const Problem& p,
                      int64_t num_blocks) {
  int64_t longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    TORCH_CHECK(leftpad == nullptr || (leftpad[b] >= 0 && leftpad[b] <= length[b]), "flash_attn_with_kvcache: ",
                "cache_leftpad[", b, "] must lie in [0, ", length[b], "]");
    TORCH_CHECK(length[b] >= 0 && length[b] <= p.table_width * p.block_size, "flash_attn_with_kvcache: seqlens[", b,
                "] = ", length[b], " must lie in [0, ", p.table_width * p.block_size, "]");
    for (int64_t j = 0; j * p.block_size < length[b]; ++j) {
      const int32_t page = table[b * p.table_width + j];
      TORCH_CHECK(page >= 0 && page < num_blocks, "flash_attn_with_kvcache: block_table[", b, ", ", j, "] = ", page,
                  " is used but not a block of the cache (which has ", num_blocks, ")");
    }
    longest = std::max<int64_t>(longest, length[b]);
  }
  return longest;
}

// scalar_t: q's dtype; cache_t: the caches' (scalar_t, or c10::Float8_e4m3fn with descales [B, Hkv]).
template <typename scalar_t, typename cache_t>
class GroupAttention {
 public:
  GroupAttention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int32_t* lengths,
                 const int32_t* leftpad, const int32_t* table, const float* k_descale, const float* v_descale,
                 const Problem& p)
      : q_(q.const_data_ptr<scalar_t>()),
        k_(static_cast<const cache_t*>(k_cache.const_data_ptr())),
        v_(static_cast<const cache_t*>(v_cache.const_data_ptr())),
        k_descale_(k_descale),
        v_descale_(v_descale),
        q_strides_{q.stride(0), q.stride(1), q.stride(2)},
        k_strides_{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)},
        v_strides_{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)},
        lengths_(lengths),
        leftpad_(leftpad),
        table_(table),
        p_(p) {}

  // Attends rows of (b, g) over split s of `splits`; writes acc [rows, D] (normalised, 0 for a row without keys) and
  // lse [rows] (natural log, -inf without keys).
  void run(int64_t b, int64_t g, int64_t s, int64_t splits, float* acc, float* lse) const {
    const int64_t rows = p_.seqlen_q * p_.group, d = p_.head_dim, length = lengths_[b];
    const int64_t first = leftpad_ == nullptr ? 0 : leftpad_[b];
    const float q_scale = p_.softcap > 0.0f ? p_.scale / p_.softcap : p_.scale;
    std::vector<float> q(rows * d), scores(rows * kTile), row_max(rows, kNegInf), row_sum(rows, 0.0f);
    std::vector<float> k_tile(kTile * d), v_tile(kTile * d);
    std::vector<int64_t> lower(rows), upper(rows);
    const int64_t unit = b * p_.heads_kv + g;
    const float k_descale = k_descale_ == nullptr ? 1.0f : k_descale_[unit];
    const float v_descale = v_descale_ == nullptr ? 1.0f : v_descale_[unit];
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* src = q_ + b * q_strides_[0] + (r / p_.group) * q_strides_[1] + (g * p_.group + r % p_.group) *
                                                                                       q_strides_[2];
      for (int64_t i = 0; i < d; ++i) q[r * d + i] = static_cast<float>(src[i]) * q_scale;
      const int64_t diagonal = r / p_.group + length - p_.seqlen_q;
      lower[r] = std::max<int64_t>(p_.window_left >= 0 ? diagonal - p_.window_left : 0, first);
      upper[r] = p_.window_right >= 0 ? std::min<int64_t>(diagonal + p_.window_right + 1, length) : length;
    }
    std::fill(acc, acc + rows * d, 0.0f);
    const int64_t lo = *std::min_element(lower.begin(), lower.end());
    const int64_t hi = *std::max_element(upper.begin(), upper.end());
    const int64_t chunk = hi > lo ? (hi - lo + splits - 1) / splits : 0;
    const int64_t start = lo + s * chunk, end = std::min(start + chunk, hi);
    for (int64_t tile = start; tile < end; tile += kTile) {
      const int64_t n = std::min(kTile, end - tile);
      const float* keys[kTile];
      const float* values[kTile];
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = tile + j;
        const int64_t page = table_[b * p_.table_width + pos / p_.block_size], row = pos % p_.block_size;
        keys[j] = load(k_ + page * k_strides_[0] + row * k_strides_[1] + g * k_strides_[2], &k_tile[j * d], k_descale);
        values[j] =
            load(v_ + page * v_strides_[0] + row * v_strides_[1] + g * v_strides_[2], &v_tile[j * d], v_descale);
      }
      attend_tile(q.data(), rows, d, keys, values, n, tile, lower.data(), upper.data(), p_.softcap, scores.data(),
                  row_max.data(), row_sum.data(), acc);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const bool seen = row_sum[r] > 0.0f;
      const float inv = seen ? 1.0f / row_sum[r] : 0.0f;
      for (int64_t i = 0; i < d; ++i) acc[r * d + i] *= inv;
      lse[r] = seen ? row_max[r] + std::log(row_sum[r]) : kNegInf;
    }
  }

 private:
  // A K/V row as fp32: in place for fp32, converted into `buffer` for fp16/bf16, and for fp8 times its descale.
  const float* load(const cache_t* src, float* buffer, float descale) const {
    if constexpr (std::is_same_v<cache_t, float>) {
      return src;
    } else if constexpr (std::is_same_v<cache_t, c10::Float8_e4m3fn>) {
      for (int64_t i = 0; i < p_.head_dim; ++i) buffer[i] = static_cast<float>(src[i]) * descale;
      return buffer;
    } else {
      vec::to_float(src, buffer, p_.head_dim);
      return buffer;
    }
  }

  const scalar_t* q_;
  const cache_t* k_;
  const cache_t* v_;
  const float* k_descale_;  // nullptr: 1
  const float* v_descale_;
  int64_t q_strides_[3], k_strides_[3], v_strides_[3];
  const int32_t* lengths_;
  const int32_t* leftpad_;  // nullptr: 0
  const int32_t* table_;
  Problem p_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_with_kvcache_cpu(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k,
    const std::optional<at::Tensor>& v, const at::Tensor& cache_seqlens, const at::Tensor& block_table,
    const std::optional<at::Tensor>& cache_leftpad, double softmax_scale, int64_t window_left, int64_t window_right,
    double softcap, int64_t num_splits, const std::optional<at::Tensor>& k_descale,
    const std::optional<at::Tensor>& v_descale) {
  TORCH_CHECK(softcap >= 0.0 && num_splits >= 0, "flash_attn_with_kvcache: softcap and num_splits must be >= 0, got ",
              softcap, " and ", num_splits);
  check_kvcache_args(q, k_cache, v_cache, cache_seqlens, block_table, k_descale, v_descale);
  TORCH_CHECK(!k.has_value() || !k_descale.has_value(),
              "flash_attn_with_kvcache: new k/v cannot be appended to an fp8 cache (use reshape_and_cache first)");
  const at::Tensor k_descales = k_descale.has_value() ? k_descale->contiguous() : at::Tensor();
  const at::Tensor v_descales = v_descale.has_value() ? v_descale->contiguous() : at::Tensor();
  TORCH_CHECK(k.has_value() == v.has_value(), "flash_attn_with_kvcache: k and v must be given together");
  const int64_t num_new = k.has_value() ? k->size(1) : 0;
  if (k.has_value()) {
    TORCH_CHECK(k->dim() == 4 && k->size(0) == q.size(0) && k->size(2) == k_cache.size(2) &&
                    k->size(3) == k_cache.size(3) && v->sizes() == k->sizes(),
                "flash_attn_with_kvcache: k and v must be [B, Sq_new, Hkv, D] = [", q.size(0), ", Sq_new, ",
                k_cache.size(2), ", ", k_cache.size(3), "], got ", k->sizes(), " and ", v->sizes());
  }
  const at::Tensor lengths = (cache_seqlens + num_new).to(at::kInt).contiguous(), table = block_table.contiguous();
  at::Tensor leftpads;
  if (cache_leftpad.has_value()) {
    TORCH_CHECK(cache_leftpad->scalar_type() == at::kInt && cache_leftpad->dim() == 1 &&
                    cache_leftpad->size(0) == q.size(0),
                "flash_attn_with_kvcache: cache_leftpad must be int32 [B] with B = ", q.size(0), ", got ",
                cache_leftpad->scalar_type(), " ", cache_leftpad->sizes());
    leftpads = cache_leftpad->contiguous();
  }
  const Problem p{q.size(0),       q.size(1),     k_cache.size(2), q.size(2) / k_cache.size(2),
                  q.size(3),       k_cache.size(1), table.size(1), window_left,
                  window_right,    static_cast<float>(softmax_scale), static_cast<float>(softcap)};
  const int32_t* length = lengths.const_data_ptr<int32_t>();
  const int32_t* leftpad = leftpads.defined() ? leftpads.const_data_ptr<int32_t>() : nullptr;
  const int32_t* pages = table.const_data_ptr<int32_t>();
  const int64_t longest = check_lengths(length, leftpad, pages, p, k_cache.size(0));  // before anything is written
  if (num_new > 0) {  // the new tokens go to positions cache_seqlens[b] + i, then the queries attend
    const at::Tensor positions =
        cache_seqlens.to(at::kLong).unsqueeze(1) + at::arange(num_new, lengths.options().dtype(at::kLong));
    const at::Tensor pages_of_new = table.to(at::kLong).gather(1, at::floor_divide(positions, p.block_size));
    const at::Tensor slots = pages_of_new * p.block_size + positions.remainder(p.block_size);
    reshape_and_cache_cpu(k->flatten(0, 1).contiguous(), v->flatten(0, 1).contiguous(), k_cache, v_cache,
                          slots.flatten(), std::nullopt, std::nullopt);
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  const int64_t rows = p.seqlen_q * p.group, units = p.batch * p.heads_kv;
  if (out.numel() == 0) return {out, lse};
  const int64_t threads = at::get_num_threads();
  const int64_t splits =
      num_splits > 0 ? num_splits
      : units >= threads
          ? 1
          : std::max<int64_t>(1, std::min((threads + units - 1) / units, longest / kMinSplitKeys));
  // Slices' outputs [splits, B, Hkv, rows, D] and log-sum-exps [splits, B, Hkv, rows], fp32.
  at::Tensor part_out = at::empty({splits, units, rows, p.head_dim}, q.options().dtype(at::kFloat));
  at::Tensor part_lse = at::empty({splits, units, rows}, q.options().dtype(at::kFloat));
  float* part_acc = part_out.mutable_data_ptr<float>();
  float* part_l = part_lse.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_attn_with_kvcache_cpu", [&] {
    auto attend = [&](const auto& attention) {
      at::parallel_for(0, splits * units, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t s = item / units, unit = item % units;
          attention.run(unit / p.heads_kv, unit % p.heads_kv, s, splits, part_acc + item * rows * p.head_dim,
                        part_l + item * rows);
        }
      });
    };
    if (k_descales.defined()) {
      attend(GroupAttention<scalar_t, c10::Float8_e4m3fn>(q, k_cache, v_cache, length, leftpad, pages,
                                                          k_descales.const_data_ptr<float>(),
                                                          v_descales.const_data_ptr<float>(), p));
    } else {
      attend(GroupAttention<scalar_t, scalar_t>(q, k_cache, v_cache, length, leftpad, pages, nullptr, nullptr, p));
    }
    // Merge the slices of each (b, g) and write its rows to out [B, Sq, Hq, D].
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    float* dst_lse = lse.mutable_data_ptr<float>();
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> merged(p.head_dim);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t b = unit / p.heads_kv, g = unit % p.heads_kv;
        for (int64_t r = 0; r < rows; ++r) {
          float top = kNegInf;
          for (int64_t s = 0; s < splits; ++s) top = std::max(top, part_l[(s * units + unit) * rows + r]);
          std::fill(merged.begin(), merged.end(), 0.0f);
          float total = 0.0f;
          for (int64_t s = 0; s < splits && top > kNegInf; ++s) {
            const float weight = std::exp(part_l[(s * units + unit) * rows + r] - top);
            scale_axpy(merged.data(), 1.0f, weight, part_acc + ((s * units + unit) * rows + r) * p.head_dim,
                       p.head_dim);
            total += weight;
          }
          const float inv = total > 0.0f ? 1.0f / total : 0.0f;
          scalar_t* row = dst + ((b * p.seqlen_q + r / p.group) * p.heads_kv * p.group + g * p.group + r % p.group) *
                                    p.head_dim;
          for (int64_t i = 0; i < p.head_dim; ++i) row[i] = static_cast<scalar_t>(merged[i] * inv);
          const int64_t head = g * p.group + r % p.group;  // lse [B, Hq, Sq]
          dst_lse[(b * p.heads_kv * p.group + head) * p.seqlen_q + r / p.group] =
              total > 0.0f ? top + std::log(total) : std::numeric_limits<float>::infinity();
        }
      }
    });
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(qwen_fast, CPU, m) { m.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache_cpu); }

}  // namespace qwen_fast
