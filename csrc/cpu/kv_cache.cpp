// CPU reshape_and_cache: one worker per token, parallel over tokens (fp8 caches: a converting copy). Per-token
// logic: ../kv_cache.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../kv_cache_checks.h"
#include "../ops.h"

namespace qwen_fast {

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping,
                           const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const CacheLayout layout =
      check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale);
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_blocks = key_cache.size(0);
  const int64_t capacity = num_blocks * layout.block_size;
  for (int64_t i = 0; i < key.size(0); ++i) {
    TORCH_CHECK(slot[i] < capacity, "reshape_and_cache: slot_mapping[", i, "] = ", slot[i],
                " is past the cache's ", capacity, " slots");
  }
  if (k_scale.has_value()) {  // fp8 caches: convert each element
    const float ks = k_scale->item<float>(), vs = v_scale->item<float>();
    auto* kc = static_cast<c10::Float8_e4m3fn*>(key_cache.mutable_data_ptr());
    auto* vc = static_cast<c10::Float8_e4m3fn*>(value_cache.mutable_data_ptr());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "reshape_and_cache", [&] {
      const scalar_t* k = key.const_data_ptr<scalar_t>();
      const scalar_t* v = value.const_data_ptr<scalar_t>();
      at::parallel_for(0, key.size(0), 16, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) quantize_token_to_cache(k, v, kc, vc, ks, vs, t, slot[t], layout, 0, 1);
      });
    });
    return;
  }
  dispatch_by_element_size(key.element_size(), "reshape_and_cache", [&](auto tag) {
    using Bits = decltype(tag);
    const Bits* k = static_cast<const Bits*>(key.const_data_ptr());
    const Bits* v = static_cast<const Bits*>(value.const_data_ptr());
    Bits* kc = static_cast<Bits*>(key_cache.mutable_data_ptr());
    Bits* vc = static_cast<Bits*>(value_cache.mutable_data_ptr());
    at::parallel_for(0, key.size(0), 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) copy_token_to_cache(k, v, kc, vc, t, slot[t], layout, 0, 1);
    });
  });
}

TORCH_LIBRARY_IMPL(qwen_fast, CPU, m) { m.impl("reshape_and_cache", &reshape_and_cache_cpu); }

}  // namespace qwen_fast
