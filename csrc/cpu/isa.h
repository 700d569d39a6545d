// Which x86 instruction sets the CPU kernels use, chosen at run time (no build flag): the extension is compiled for
// the baseline x86-64, and the functions that have faster variants are compiled again with GCC/Clang target
// attributes (QF_TARGET_*). cpu_isa() picks the best level the CPU supports; QWEN_FAST_CPU_ISA (baseline, avx2,
// avx512, avx512_bf16; read at each call) lowers it, so that every variant can be run and compared with the
// reference on one machine (tests/test_cpu_isa.py). Asking for a level the CPU lacks is an error, never a crash.
//
// Levels: avx2 = x86-64-v3 (AVX2, FMA, F16C, BMI1/2); avx512 = x86-64-v4 (AVX-512 F, BW, DQ, VL, CD); avx512_bf16 =
// avx512 + AVX512_BF16 (vdpbf16ps). AMX and AVX512_VNNI are not used: the kernels keep activations in their dtype
// (w8a16), and the integer dot products need 8-bit activations. A compiler without these targets (non-x86, old
// GCC/Clang) builds the baseline alone.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define QF_X86_ISA 1
#define QF_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define QF_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define QF_TARGET_AVX512_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#else
#define QF_X86_ISA 0
#define QF_TARGET_AVX2
#define QF_TARGET_AVX512
#define QF_TARGET_AVX512_BF16
#endif

namespace qwen_fast {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The best level this CPU (and this build) supports.
Isa detected_isa();

// detected_isa(), or the lower level QWEN_FAST_CPU_ISA names (TORCH_CHECK naming the variable for an unknown name or
// a level above detected_isa()).
Isa cpu_isa();

const char* isa_name(Isa isa);

}  // namespace qwen_fast
