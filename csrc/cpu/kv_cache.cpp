// CPU reshape_and_cache: one worker per token, parallel over tokens. Per-token logic: ../kv_cache.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../kv_cache_checks.h"
#include "../ops.h"

namespace qwen_fast {

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  const CacheLayout layout = check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_blocks = key_cache.size(0);
  const int64_t capacity = num_blocks * layout.block_size;
  for (int64_t i = 0; i < key.size(0); ++i) {
    TORCH_CHECK(slot[i] < capacity, "reshape_and_cache: slot_mapping[", i, "] = ", slot[i],
                " is past the cache's ", capacity, " slots");
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
