// The CPU vector path of fastsd's C++ kernels: one choice for the process, made at the first call.
//
// Kernels with vector loops are compiled once per instruction set (AVX-512, AVX2 + FMA, and the
// build's baseline, "default"); cpu_isa() picks the widest one that all of these allow:
//   * the CPU (__builtin_cpu_supports);
//   * ATen's CPU capability, which ATEN_CPU_CAPABILITY=default|avx2|avx512 lowers for PyTorch's own
//     kernels: one variable makes PyTorch and fastsd behave as on a machine without AVX-512;
//   * FASTSD_CPU_CAPABILITY=default|avx2|avx512, which lowers fastsd's choice alone (e.g. to time
//     fastsd's AVX2 kernels against PyTorch's widest ones). Any other value is a ValueError.
// The dispatch is explicit (function pointers), not GCC's target_clones: an ifunc resolver sees
// only the CPU and cannot be capped. torch.ops.fastsd_C.cpu_capability() and
// `python -m fastsd.info` report the choice.
#pragma once

#include <string>

// GCC on x86-64: several instruction sets in one binary (function-level target attributes and
// #pragma GCC target). Elsewhere only the baseline is built.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSD_MULTI_ISA 1
// The features each path needs, as GCC target strings (cpu_isa() checks the same list).
#define FASTSD_TARGET_AVX512 "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
#define FASTSD_TARGET_AVX2 "avx2,fma"
#endif

namespace fastsd {
namespace cpu {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The path in use (see above); chosen once, thread-safe.
Isa cpu_isa();

// "default", "avx2" or "avx512", as ATEN_CPU_CAPABILITY spells them.
const char* isa_name(Isa isa);

}  // namespace cpu
}  // namespace fastsd
