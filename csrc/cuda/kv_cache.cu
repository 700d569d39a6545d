// CUDA reshape_and_cache: one thread block per token; its threads stride over the head dim of each head (fp8
// caches: a converting copy, the scales read on the device).
// Per-token logic: ../kv_cache.h. Slots past the cache are not checked here (that would need a host sync); the
// Python API checks them when it can do so without one (CPU tensors), and the CPU kernel always does.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../dispatch.h"
#include "../kv_cache_checks.h"
#include "../ops.h"

namespace qwen_fast {

template <typename Bits>
__global__ void reshape_and_cache_kernel(const Bits* __restrict__ key, const Bits* __restrict__ value,
                                         Bits* __restrict__ key_cache, Bits* __restrict__ value_cache,
                                         const int64_t* __restrict__ slot_mapping, CacheLayout layout) {
  const int64_t token = blockIdx.x;
  copy_token_to_cache(key, value, key_cache, value_cache, token, slot_mapping[token], layout, threadIdx.x,
                      blockDim.x);
}

template <typename scalar_t>
__global__ void quantize_and_cache_kernel(const scalar_t* __restrict__ key, const scalar_t* __restrict__ value,
                                          c10::Float8_e4m3fn* __restrict__ key_cache,
                                          c10::Float8_e4m3fn* __restrict__ value_cache,
                                          const int64_t* __restrict__ slot_mapping, const float* __restrict__ k_scale,
                                          const float* __restrict__ v_scale, CacheLayout layout) {
  const int64_t token = blockIdx.x;
  quantize_token_to_cache(key, value, key_cache, value_cache, *k_scale, *v_scale, token, slot_mapping[token], layout,
                          threadIdx.x, blockDim.x);
}

void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping,
                            const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const CacheLayout layout =
      check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale);
  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0) return;
  const at::cuda::OptionalCUDAGuard guard(key.device());
  const at::Tensor slots = slot_mapping.contiguous();
  const int threads = static_cast<int>(std::min<int64_t>(std::max<int64_t>(layout.head_dim, 32), 512));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (k_scale.has_value()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "reshape_and_cache", [&] {
      quantize_and_cache_kernel<scalar_t><<<num_tokens, threads, 0, stream>>>(
          key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
          static_cast<c10::Float8_e4m3fn*>(key_cache.mutable_data_ptr()),
          static_cast<c10::Float8_e4m3fn*>(value_cache.mutable_data_ptr()), slots.const_data_ptr<int64_t>(),
          k_scale->const_data_ptr<float>(), v_scale->const_data_ptr<float>(), layout);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  dispatch_by_element_size(key.element_size(), "reshape_and_cache", [&](auto tag) {
    using Bits = decltype(tag);
    reshape_and_cache_kernel<Bits><<<num_tokens, threads, 0, stream>>>(
        static_cast<const Bits*>(key.const_data_ptr()), static_cast<const Bits*>(value.const_data_ptr()),
        static_cast<Bits*>(key_cache.mutable_data_ptr()), static_cast<Bits*>(value_cache.mutable_data_ptr()),
        slots.const_data_ptr<int64_t>(), layout);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(qwen_fast, CUDA, m) { m.impl("reshape_and_cache", &reshape_and_cache_cuda); }

}  // namespace qwen_fast
