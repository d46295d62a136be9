// fastsd::cpu::cpu_isa (see capability.h) and torch.ops.fastsd_C.cpu_capability().
#include "capability.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>

namespace fastsd {
namespace cpu {
namespace {

// The widest path this CPU runs.
Isa cpu_supported() {
#if defined(FASTSD_MULTI_ISA)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

// ATen's capability (ATEN_CPU_CAPABILITY lowers it): "AVX512", "AVX2", else the baseline.
Isa aten_capability() {
  const std::string c = at::get_cpu_capability();
  if (c == "AVX512") return Isa::kAvx512;
  if (c == "AVX2") return Isa::kAvx2;
  return Isa::kDefault;
}

// FASTSD_CPU_CAPABILITY, unset or empty: no cap.
Isa fastsd_cap() {
  const char* env = std::getenv("FASTSD_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return Isa::kAvx512;
  for (Isa isa : {Isa::kDefault, Isa::kAvx2, Isa::kAvx512})
    if (std::strcmp(env, isa_name(isa)) == 0) return isa;
  TORCH_CHECK_VALUE(false, "FASTSD_CPU_CAPABILITY must be one of default, avx2, avx512 (or unset), got '", env,
                    "'");
}

struct Choice {
  Isa in_use, cpu;
};

const Choice& choice() {
  static const Choice c = [] {
    const Isa cpu = cpu_supported();
    return Choice{std::min({cpu, aten_capability(), fastsd_cap()}), cpu};
  }();
  return c;
}

// (the path in use, the widest this CPU runs), for fastsd.info and the tests.
std::tuple<std::string, std::string> cpu_capability_op() {
  return {isa_name(choice().in_use), isa_name(choice().cpu)};
}

}  // namespace

Isa cpu_isa() { return choice().in_use; }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace cpu
}  // namespace fastsd

TORCH_LIBRARY_FRAGMENT(fastsd_C, m) {
  m.def("cpu_capability() -> (str, str)", &fastsd::cpu::cpu_capability_op);
}
