// Host-side checks of reshape_and_cache's arguments, shared by the CPU and CUDA implementations. The Python
// functional API checks first with friendlier messages; these guard direct torch.ops.qwen_fast calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "kv_cache.h"

namespace qwen_fast {

// With k_scale and v_scale (fp32, one element each) the caches must be float8_e4m3fn, else key's dtype.
inline CacheLayout check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& key_cache, const at::Tensor& value_cache,
                                           const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scale,
                                           const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), "reshape_and_cache: k_scale and v_scale go together");
  for (const std::optional<at::Tensor>* scale : {&k_scale, &v_scale}) {
    TORCH_CHECK(!scale->has_value() || ((*scale)->scalar_type() == at::kFloat && (*scale)->numel() == 1 &&
                                        (*scale)->device() == key.device()),
                "reshape_and_cache: k_scale and v_scale must be fp32 tensors of one element on key's device");
  }
  const bool fp8 = k_scale.has_value();
  TORCH_CHECK(key.dim() == 3, "reshape_and_cache: key must be [N, Hkv, D], got ", key.sizes());
  TORCH_CHECK(key_cache.dim() == 4, "reshape_and_cache: key_cache must be [num_blocks, block_size, Hkv, D], got ",
              key_cache.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), "reshape_and_cache: value must have key's shape ", key.sizes(), ", got ",
              value.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "reshape_and_cache: value_cache must have key_cache's shape ",
              key_cache.sizes(), ", got ", value_cache.sizes());
  TORCH_CHECK(key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2),
              "reshape_and_cache: key_cache heads/dim ", key_cache.sizes(), " do not match key ", key.sizes());
  const at::ScalarType cache_type = fp8 ? at::kFloat8_e4m3fn : key.scalar_type();
  TORCH_CHECK(value.scalar_type() == key.scalar_type() && key_cache.scalar_type() == cache_type &&
                  value_cache.scalar_type() == cache_type,
              "reshape_and_cache: key and value must share a dtype and the caches must be ", cache_type, ", got ",
              key.scalar_type(), " and ", key_cache.scalar_type());
  for (const at::Tensor* t : {&key, &value, &key_cache, &value_cache}) {
    TORCH_CHECK(t->stride(-1) == 1 || t->size(-1) <= 1,
                "reshape_and_cache: the head_dim of key, value and the caches must be contiguous, got strides ",
                t->strides());
  }
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == key.size(0),
              "reshape_and_cache: slot_mapping must be int64 [N] with N = ", key.size(0), ", got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  auto strides = [](const at::Tensor& source, const at::Tensor& cache) {
    return CacheStrides{source.stride(0), source.stride(1), cache.stride(0), cache.stride(1), cache.stride(2)};
  };
  return CacheLayout{strides(key, key_cache), strides(value, value_cache), key_cache.size(1), key.size(1),
                     key.size(2)};
}

}  // namespace qwen_fast
