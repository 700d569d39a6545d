// Host-side checks of reshape_and_cache's arguments, shared by the CPU and CUDA implementations. The Python
// functional API checks first with friendlier messages; these guard direct torch.ops.qwen_fast calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kv_cache.h"

namespace qwen_fast {

inline CacheLayout check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& key_cache, const at::Tensor& value_cache,
                                           const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3, "reshape_and_cache: key must be [N, Hkv, D], got ", key.sizes());
  TORCH_CHECK(key_cache.dim() == 4, "reshape_and_cache: key_cache must be [num_blocks, block_size, Hkv, D], got ",
              key_cache.sizes());
  TORCH_CHECK(value.sizes() == key.sizes() && value.strides() == key.strides(),
              "reshape_and_cache: value must have key's shape and strides, got ", value.sizes(), " vs ",
              key.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes() && value_cache.strides() == key_cache.strides(),
              "reshape_and_cache: value_cache must have key_cache's shape and strides, got ", value_cache.sizes(),
              " vs ", key_cache.sizes());
  TORCH_CHECK(key_cache.size(2) == key.size(1) && key_cache.size(3) == key.size(2),
              "reshape_and_cache: key_cache heads/dim ", key_cache.sizes(), " do not match key ", key.sizes());
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == key.scalar_type() &&
                  value_cache.scalar_type() == key.scalar_type(),
              "reshape_and_cache: key, value and caches must share a dtype, got ", key.scalar_type(), " and ",
              key_cache.scalar_type());
  TORCH_CHECK(key.stride(2) == 1 && key_cache.stride(3) == 1,
              "reshape_and_cache: the head_dim of key and key_cache must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == key.size(0),
              "reshape_and_cache: slot_mapping must be int64 [N] with N = ", key.size(0), ", got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  return CacheLayout{key.stride(0),       key.stride(1),     key_cache.stride(0), key_cache.stride(1),
                     key_cache.stride(2), key_cache.size(1), key.size(1),         key.size(2)};
}

}  // namespace qwen_fast
