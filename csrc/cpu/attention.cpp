// CPU flash attention forward (GQA/MQA, varlen; the dense batch arrives as B equal-length sequences): the semantics
// of qwen_fast/reference/attention.py, computed FlashAttention-style without any [Sq, Sk] matrix.
//
// Work item = (sequence b, KV head h, block of kBlockQ query positions). Its rows are the (position, query head)
// pairs of the block for the G = Hq / Hkv query heads of KV head h, position-major: all G heads of a KV group run
// together, so each K/V tile is converted and read once per group, never repeated per query head. Items are dealt
// round-robin to the threads (at::parallel_for over thread slots), which balances causal blocks of unequal length.
//
// Per item, in a per-thread fp32 workspace: Q rows [rows, D] (converted on load, pre-multiplied by
// softmax_scale * log2(e), or by softmax_scale / softcap with a softcap), the accumulator [rows, D], the running max
// m and sum l per row (base 2). Per key tile of kBlockK keys: K and V [kBlockK, D] converted to fp32 once; scores
// s = Q K^T [rows, kBlockK] by one GEMM (at::mm_out on the workspace, i.e. the BLAS torch links: the extension is
// built without -mavx2, so at::vec's dot products ran its portable 8-float path, several times slower than the
// GEMM); with softcap > 0 the scores then become tanh(s) * softcap * log2(e) (flash-attn's
// softcap * tanh(q.k * softmax_scale / softcap), in base 2); the mask (key in [d(i) - left, d(i) + right],
// d(i) = i + Sk - Sq); online softmax with vec.h's exp (softmax_tile): m' = max(m, max s), p = exp2(s - m'),
// acc = acc * exp2(m - m'), l likewise; then acc += P V by a second GEMM. A row with no visible key so far has
// m = -inf; the exponent base is then 0, so p = 0 and nothing is NaN; the output is acc / l, or 0 where l = 0, and
// the row's lse [Hq, Tq] (natural log) is (m + log2 l) * ln 2, or +inf where l = 0 (flash-attn's value for a row
// with nothing to attend to; rows outside every sequence too). Only the key range some row of the item can see
// ([d(first) - left, d(last) + right]) is visited: fully masked tiles (causal, window) are never computed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../ops.h"
#include "vec.h"

// MKL's per-thread thread count (C interface), exported by torch's x86 builds (MKL is linked into libtorch_cpu); weak, so that the
// extension still loads where torch has no MKL. The tile GEMMs run inside our own parallel region, where an MKL
// that threads as well oversubscribes the cores (measured: 870 ms instead of 67 ms, causal S = 512, 2 threads).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace qwen_fast {
namespace {

using vec::kLanes;
constexpr int64_t kBlockQ = 16;  // query positions per work item (rows = kBlockQ * G)
constexpr int64_t kBlockK = 128;  // keys per tile: one [rows, kBlockK] score GEMM
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

struct Item {
  int64_t batch, kv_head, first;  // sequence, KV head, first query position of the block
};

struct Layout {
  int64_t num_heads_q, group, head_dim;
  int64_t q_token, q_head, k_token, k_head, v_token, v_head;  // strides, in elements
  int64_t left, right;  // window edges, -1 = unbounded (causal already folded into right = 0)
  float q_scale;   // multiplies q on load: softmax_scale * log2(e), or softmax_scale / softcap with a softcap
  float cap_log2;  // softcap * log2(e); 0 = no softcap
};

void check_flash_attn_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                             const at::Tensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                             int64_t window_left, int64_t window_right, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "flash_attn_varlen: q and k must be [T, H, D], got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "flash_attn_varlen: v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "flash_attn_varlen: k and v must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(k.size(2) == q.size(2), "flash_attn_varlen: k's head dim ", k.size(2), " must equal q's ", q.size(2));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "flash_attn_varlen: the query heads Hq=", q.size(1),
              " must be a nonzero multiple of the key/value heads Hkv=", k.size(1));
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->size(2) <= 1 || t->stride(2) == 1, "flash_attn_varlen: q, k, v must be contiguous in the head dim",
                ", got strides ", t->strides());
  }
  TORCH_CHECK(cu_q.dim() == 1 && cu_q.size(0) >= 1 && cu_k.sizes() == cu_q.sizes(),
              "flash_attn_varlen: cu_seqlens_q and cu_seqlens_k must both be [B + 1], got ", cu_q.sizes(), " and ",
              cu_k.sizes());
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt,
              "flash_attn_varlen: cu_seqlens must be int32, got ", cu_q.scalar_type(), " and ", cu_k.scalar_type());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "flash_attn_varlen: softmax_scale must be finite and > 0, got ",
              scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "flash_attn_varlen: softcap must be finite and >= 0, got ",
              softcap);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "flash_attn_varlen: window edges must be >= -1, got (",
              window_left, ", ", window_right, ")");
  const int64_t totals[2] = {q.size(0), k.size(0)};
  const int64_t longest[2] = {max_seqlen_q, max_seqlen_k};
  const char* names[2] = {"cu_seqlens_q", "cu_seqlens_k"};
  const at::Tensor* cus[2] = {&cu_q, &cu_k};
  for (int s = 0; s < 2; ++s) {
    const at::Tensor cu = cus[s]->contiguous();
    const int32_t* off = cu.const_data_ptr<int32_t>();
    TORCH_CHECK(off[0] == 0, "flash_attn_varlen: ", names[s], " must start at 0, got ", off[0]);
    for (int64_t b = 0; b + 1 < cu.size(0); ++b) {
      TORCH_CHECK(off[b + 1] >= off[b] && off[b + 1] - off[b] <= longest[s] && off[b + 1] <= totals[s],
                  "flash_attn_varlen: ", names[s], " must be non-decreasing, with sequences of at most ", longest[s],
                  " tokens ending at <= ", totals[s], "; got ", off[b], " then ", off[b + 1], " at index ", b + 1);
    }
  }
}

// One key tile's softmax for every row of an item (base 2): row r sees tile keys [first, last] with
// first = diag(r) - left, last = diag(r) + right (diag(r) = diag0 + r / group, relative to the tile; -1 edges are
// unbounded); invisible scores become -inf. Each row's scores s[0:nk] turn into p = exp2(s - m'), its max m and sum l
// are updated and its accumulator [D] rescaled by exp2(m - m'). A row with no visible key so far keeps m = -inf and
// gets p = 0: never NaN. Compiled for AVX2 + FMA and for the baseline (QF_CPU_CLONES, vec.h: at::vec is the scalar
// generic without -mavx2); exp2(x) = exp(x ln 2), and x below -87 (p < 2^-125) is 0.
QF_CPU_CLONES void softmax_tile(float* scores, int64_t rows, int64_t nk, int64_t group, int64_t diag0, int64_t left,
                                int64_t right, float* m, float* l, float* acc, int64_t D) {
  constexpr float kLn2 = 0.69314718055994531f;
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * nk;
    const int64_t diag = diag0 + r / group;
    const int64_t first_key = left < 0 ? 0 : diag - left, last_key = right < 0 ? nk - 1 : diag + right;
    float row_max = kNegInf;
    for (int64_t j = 0; j < nk; ++j) {
      if (j < first_key || j > last_key) s[j] = kNegInf;
      row_max = std::max(row_max, s[j]);
    }
    const float m_new = std::max(m[r], row_max);
    const float base = m_new == kNegInf ? 0.0f : m_new;  // no visible key yet: exp2(-inf - 0) = 0
    vec::Vec sum = {};
    int64_t j = 0;
    for (; j + kLanes <= nk; j += kLanes) {
      const vec::Vec x = (vec::load(s + j) - base) * kLn2;
      const vec::Vec p = x < -87.0f ? vec::Vec{} : vec::exp(x);
      vec::store(s + j, p);
      sum += p;
    }
    float total = vec::hsum(sum);
    for (; j < nk; ++j) {
      s[j] = std::exp2(s[j] - base);
      total += s[j];
    }
    const float alpha = std::exp2(m[r] - base);
    l[r] = l[r] * alpha + total;
    m[r] = m_new;
    float* row_acc = acc + r * D;
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) vec::store(row_acc + d, vec::load(row_acc + d) * alpha);
    for (; d < D; ++d) row_acc[d] *= alpha;
  }
}

// Soft capping of one score tile (base 2): s = tanh(s) * cap_log2, s being q.k * softmax_scale / softcap, with
// tanh(x) = sign(x) (1 - t) / (1 + t), t = exp(-2|x|) in (0, 1] (vec.h's exp; std::tanh per score doubled the cost
// of a causal 512-token bf16 prefill). Compiled like softmax_tile (QF_CPU_CLONES).
QF_CPU_CLONES void cap_scores(float* scores, int64_t count, float cap_log2) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    const vec::Vec x = vec::load(scores + i);
    const vec::Vec t = vec::exp((x < 0.0f ? x : -x) * 2.0f);
    const vec::Vec y = (1.0f - t) / (1.0f + t) * cap_log2;
    vec::store(scores + i, x < 0.0f ? -y : y);
  }
  for (; i < count; ++i) scores[i] = std::tanh(scores[i]) * cap_log2;
}

struct Workspace {
  std::vector<float> q, acc, m, l, k, v, s;
  Workspace(int64_t rows, int64_t dim)
      : q(rows * dim), acc(rows * dim), m(rows), l(rows), k(kBlockK * dim), v(kBlockK * dim), s(rows * kBlockK) {}
};

template <typename scalar_t>
void attend_item(const Item& item, const Layout& L, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                 scalar_t* out, float* lse, int64_t total_q, const int32_t* cu_q, const int32_t* cu_k,
                 Workspace& ws) {
  const int64_t start_q = cu_q[item.batch], len_q = cu_q[item.batch + 1] - start_q;
  const int64_t start_k = cu_k[item.batch], len_k = cu_k[item.batch + 1] - start_k;
  const int64_t G = L.group, D = L.head_dim;
  const int64_t positions = std::min(kBlockQ, len_q - item.first), rows = positions * G;
  const int64_t shift = len_k - len_q;  // d(i) = i + shift

  // Q rows [rows, D], position-major then head, converted and pre-scaled.
  std::fill(ws.acc.begin(), ws.acc.begin() + rows * D, 0.0f);
  std::fill(ws.m.begin(), ws.m.begin() + rows, kNegInf);
  std::fill(ws.l.begin(), ws.l.begin() + rows, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = start_q + item.first + r / G, head = item.kv_head * G + r % G;
    const scalar_t* src = q + token * L.q_token + head * L.q_head;
    for (int64_t d = 0; d < D; ++d) ws.q[r * D + d] = static_cast<float>(src[d]) * L.q_scale;
  }

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor q_rows = at::from_blob(ws.q.data(), {rows, D}, f32);
  at::Tensor acc_rows = at::from_blob(ws.acc.data(), {rows, D}, f32);

  // Keys visible to some row of the item.
  const int64_t diag_first = item.first + shift, diag_last = item.first + positions - 1 + shift;
  const int64_t lo = L.left < 0 ? 0 : std::max<int64_t>(0, diag_first - L.left);
  const int64_t hi = L.right < 0 ? len_k : std::min<int64_t>(len_k, diag_last + L.right + 1);
  for (int64_t n0 = lo; n0 < hi; n0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, hi - n0);
    for (int64_t j = 0; j < nk; ++j) {  // K and V tiles [nk, D] in fp32
      const int64_t token = start_k + n0 + j;
      const scalar_t* k_src = k + token * L.k_token + item.kv_head * L.k_head;
      const scalar_t* v_src = v + token * L.v_token + item.kv_head * L.v_head;
      for (int64_t d = 0; d < D; ++d) {
        ws.k[j * D + d] = static_cast<float>(k_src[d]);
        ws.v[j * D + d] = static_cast<float>(v_src[d]);
      }
    }
    // s [rows, nk] = q [rows, D] @ k [nk, D]^T, one GEMM per tile on the fp32 workspace.
    const at::Tensor k_tile = at::from_blob(ws.k.data(), {nk, D}, f32);
    at::Tensor scores = at::from_blob(ws.s.data(), {rows, nk}, f32);
    at::mm_out(scores, q_rows, k_tile.t());
    if (L.cap_log2 > 0.0f) cap_scores(ws.s.data(), rows * nk, L.cap_log2);
    softmax_tile(ws.s.data(), rows, nk, G, item.first + shift - n0, L.left, L.right, ws.m.data(), ws.l.data(),
                 ws.acc.data(), D);
    // acc [rows, D] += p [rows, nk] @ v [nk, D].
    at::addmm_out(acc_rows, acc_rows, scores, at::from_blob(ws.v.data(), {nk, D}, f32));
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = start_q + item.first + r / G, head = item.kv_head * G + r % G;
    scalar_t* dst = out + (token * L.num_heads_q + head) * D;
    const float inv = ws.l[r] > 0.0f ? 1.0f / ws.l[r] : 0.0f;  // no visible key: 0
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(ws.acc[r * D + d] * inv);
    constexpr float kLn2 = 0.69314718055994531f;
    if (lse != nullptr) lse[head * total_q + token] = ws.l[r] > 0.0f ? (ws.m[r] + std::log2(ws.l[r])) * kLn2 : kPosInf;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                         int64_t max_seqlen_k, double softmax_scale, bool causal,
                                                         int64_t window_left, int64_t window_right, double softcap,
                                                         bool return_lse) {
  check_flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                          window_left, window_right, softcap);
  at::Tensor out = at::zeros(q.sizes(), q.options());  // rows outside every sequence stay 0
  // and have lse +inf; without return_lse the lse is empty and nothing writes it
  at::Tensor lse = return_lse ? at::full({q.size(1), q.size(0)}, kPosInf, q.options().dtype(at::kFloat))
                              : at::empty({0}, q.options().dtype(at::kFloat));
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const int32_t* off_q = cu_q.const_data_ptr<int32_t>();
  const int32_t* off_k = cu_k.const_data_ptr<int32_t>();
  const int64_t num_kv_heads = k.size(1), head_dim = q.size(2);
  Layout layout{};
  layout.num_heads_q = q.size(1);
  layout.group = q.size(1) / num_kv_heads;
  layout.head_dim = head_dim;
  layout.q_token = q.stride(0), layout.q_head = q.stride(1);
  layout.k_token = k.stride(0), layout.k_head = k.stride(1);
  layout.v_token = v.stride(0), layout.v_head = v.stride(1);
  layout.left = window_left;
  layout.right = causal ? 0 : window_right;
  layout.q_scale =
      softcap > 0 ? static_cast<float>(softmax_scale / softcap) : static_cast<float>(softmax_scale) * kLog2e;
  layout.cap_log2 = softcap > 0 ? static_cast<float>(softcap) * kLog2e : 0.0f;

  std::vector<Item> items;
  for (int64_t b = 0; b + 1 < cu_q.size(0); ++b) {
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      for (int64_t first = 0; first < off_q[b + 1] - off_q[b]; first += kBlockQ) items.push_back({b, h, first});
    }
  }
  const int64_t num_items = static_cast<int64_t>(items.size());
  if (num_items == 0 || head_dim == 0) return {out, lse};
  const int64_t slots = std::min<int64_t>(num_items, at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_attn_varlen_cpu", [&] {
    const scalar_t* q_data = q.const_data_ptr<scalar_t>();
    const scalar_t* k_data = k.const_data_ptr<scalar_t>();
    const scalar_t* v_data = v.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    float* lse_data = return_lse ? lse.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
      const int mkl_threads = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;  // sequential GEMMs
      Workspace ws(kBlockQ * layout.group, layout.head_dim);
      for (int64_t slot = begin; slot < end; ++slot) {
        for (int64_t i = slot; i < num_items; i += slots) {  // round-robin: balances causal blocks
          attend_item(items[i], layout, q_data, k_data, v_data, out_data, lse_data, q.size(0), off_q, off_k, ws);
        }
      }
      if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_threads);  // 0 restores the global setting
    });
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(qwen_fast, CPU, m) { m.impl("flash_attn_varlen_func", &flash_attn_varlen_cpu); }

}  // namespace qwen_fast
