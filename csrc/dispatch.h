// Dispatch on element size for ops that only move data: one instantiation per size instead of per dtype.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace qwen_fast {

// Calls f(Bits{}) with an unsigned integer type of `element_size` bytes.
template <typename F>
void dispatch_by_element_size(int64_t element_size, const char* op, F&& f) {
  switch (element_size) {
    case 1: f(uint8_t{}); break;
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK(false, op, ": unsupported element size ", element_size);
  }
}

}  // namespace qwen_fast
