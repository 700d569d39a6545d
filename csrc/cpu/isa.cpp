// Run-time ISA selection (isa.h); qwen_fast._C.cpu_isa() reports it (torch_bindings.cpp).
#include "isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace qwen_fast {

namespace {

constexpr const char* kNames[] = {"baseline", "avx2", "avx512", "avx512_bf16"};

Isa detect() {
#if QF_X86_ISA
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512cd");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
  if (avx512) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

}  // namespace

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa cpu_isa() {
  const Isa best = detected_isa();
  const char* forced = std::getenv("QWEN_FAST_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return best;
  for (int level = 0; level <= static_cast<int>(Isa::kAvx512Bf16); ++level) {
    if (std::string(forced) != kNames[level]) continue;
    TORCH_CHECK(level <= static_cast<int>(best), "QWEN_FAST_CPU_ISA=", forced, " but this CPU (or build) supports ",
                isa_name(best), " at most");
    return static_cast<Isa>(level);
  }
  TORCH_CHECK(false, "QWEN_FAST_CPU_ISA must be one of baseline, avx2, avx512, avx512_bf16 (or unset), got '", forced,
              "'");
}

}  // namespace qwen_fast
