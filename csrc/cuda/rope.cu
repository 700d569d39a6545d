// CUDA rotary_embedding and qk_norm_rope_and_cache: a warp per head row. Grid (T, ceil((Hq + Hkv) / WARPS)); warp w
// of block (t, g) owns head g * WARPS + w of token t (query heads first, then key heads with their value rows). Its
// lanes stride over the row for the sum of squares (fp32, reduced with shuffles), then over the pairs for norm +
// rope + the writes. Per-row logic and roundings: ../rope.h, the same functions the CPU kernel runs (so the logic is
// tested on CPU); this file is only the launch and the warp reduction. Positions and slots are not range-checked
// here (a host sync); the Python API checks them on CPU tensors and the CPU kernel always does.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../ops.h"
#include "../rope_checks.h"

namespace qwen_fast {

constexpr int kRopeWarps = 4;  // head rows per block: 128 threads, a full Qwen3 KV group (Hkv = 4) in one block

template <typename Scalar, typename Cache>
__global__ void norm_rope_kernel(const RopeArgs<Scalar, Cache> args, const RopeLayout layout) {
  const int64_t token = blockIdx.x;
  const int64_t head = static_cast<int64_t>(blockIdx.y) * kRopeWarps + threadIdx.x / 32;
  const int64_t lane = threadIdx.x % 32;
  if (head >= layout.num_q_heads + layout.num_kv_heads) return;  // whole warps exit together
  const HeadRow<Scalar> row = head_row(args, layout, token, head);
  float sum = 0.0f;
  if (row.weight != nullptr) {
    sum = partial_sum_squares(row.x, layout.head_dim, lane, 32);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  }
  const Cache* cos = cos_sin_row(args, layout, token);
  process_row(row, cos, sum, layout, lane, 32);
  __syncwarp();  // the cache rows copy the output row, written by the other lanes
  copy_rows_to_cache(row, layout, lane, 32);
}

namespace {

// The launch for with_rope_args: grid (T, ceil((Hq + Hkv) / kRopeWarps)) on the current stream.
struct CudaLaunch {
  const RopeLayout& layout;
  dim3 grid;
  cudaStream_t stream;

  template <typename Scalar, typename Cache>
  void operator()(const RopeArgs<Scalar, Cache>& args) const {
    if (grid.x == 0 || grid.y == 0) return;
    norm_rope_kernel<Scalar, Cache><<<grid, kRopeWarps * 32, 0, stream>>>(args, layout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

CudaLaunch cuda_launch(const RopeLayout& layout, const at::Tensor& query) {
  const int64_t heads = layout.num_q_heads + layout.num_kv_heads;
  const dim3 grid(static_cast<unsigned>(query.size(0)), static_cast<unsigned>((heads + kRopeWarps - 1) / kRopeWarps));
  return CudaLaunch{layout, grid, at::cuda::getCurrentCUDAStream()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cuda(const at::Tensor& positions, const at::Tensor& query,
                                                         const at::Tensor& key, const at::Tensor& cos_sin_cache,
                                                         bool is_neox) {
  const RopeLayout layout = check_rotary("rotary_embedding", positions, query, key, cos_sin_cache, is_neox);
  const at::cuda::OptionalCUDAGuard guard(query.device());
  return with_rope_args(positions, query, key, cos_sin_cache, RopeExtras{}, cuda_launch(layout, query));
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_and_cache_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& q_norm_weight,
    const at::Tensor& k_norm_weight, double eps, const at::Tensor& positions, const at::Tensor& cos_sin_cache,
    at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping, bool is_neox) {
  const RopeLayout layout = check_qk_norm_rope_and_cache(query, key, value, q_norm_weight, k_norm_weight, eps,
                                                         positions, cos_sin_cache, key_cache, value_cache,
                                                         slot_mapping, is_neox);
  const at::cuda::OptionalCUDAGuard guard(query.device());
  const RopeExtras extras{&value, &q_norm_weight, &k_norm_weight, &key_cache, &value_cache, &slot_mapping};
  return with_rope_args(positions, query, key, cos_sin_cache, extras, cuda_launch(layout, query));
}

TORCH_LIBRARY_IMPL(qwen_fast, CUDA, m) {
  m.impl("rotary_embedding", &rotary_embedding_cuda);
  m.impl("qk_norm_rope_and_cache", &qk_norm_rope_and_cache_cuda);
}

}  // namespace qwen_fast
