// The choice of the CPU kernels' build (capability.h).
#include "capability.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace fastopt {
namespace cpu {

namespace {
// Each rule's update() of a capability namespace (the overload for the rule's Hyper).
#define FASTOPT_UPDATE_OF_DEFAULT(R) static_cast<UpdateKernel<R>>(&DEFAULT::update),
#define FASTOPT_UPDATE_OF_AVX2(R) static_cast<UpdateKernel<R>>(&AVX2::update),
#define FASTOPT_UPDATE_OF_AVX512(R) static_cast<UpdateKernel<R>>(&AVX512::update),
#define FASTOPT_KERNEL_TABLE(ns)                                                                      \
  Kernels {                                                                                         \
    FASTOPT_RULES(FASTOPT_UPDATE_OF_##ns) &ns::norm_partials, &ns::bn_moment_sums, &ns::bn_apply, \
        &ns::bn_grad_sums, &ns::bn_input_grad                                                       \
  }

// What each level asks of the CPU: the x86-64 microarchitecture levels the kernels are compiled for
// (v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE; v4: AVX-512 F, BW, CD, DQ, VL). The compiler's
// runtime checks CPUID and, for AVX and AVX-512, that the OS saves their registers (XGETBV).
#ifdef FASTOPT_CPU_X86
bool cpu_has(Capability c) {
  __builtin_cpu_init();
  switch (c) {
    case Capability::kDefault:
      return true;
    case Capability::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    case Capability::kAvx512:
      return cpu_has(Capability::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
  }
  return false;
}
#endif

const char* kRequires[] = {"nothing beyond the baseline", "AVX2, FMA, F16C, BMI1 and BMI2",
                           "AVX-512 (F, BW, CD, DQ, VL) and AVX2"};

Capability choose() {
  const char* forced = std::getenv("FASTOPT_CPU_CAPABILITY");
  if (forced != nullptr && *forced != '\0') {
    for (Capability c : {Capability::kDefault, Capability::kAvx2, Capability::kAvx512}) {
      if (std::strcmp(forced, capability_name(c)) != 0) continue;
      TORCH_CHECK(capability_supported(c), "FASTOPT_CPU_CAPABILITY=", forced, ": ",
#ifdef FASTOPT_CPU_X86
                  "this CPU cannot run these kernels (they need ", kRequires[static_cast<int>(c)], ")");
#else
                  "this build has only the default kernels (not an x86-64 build)");
#endif
      return c;
    }
    TORCH_CHECK(false, "FASTOPT_CPU_CAPABILITY=", forced, ": expected one of default, avx2, avx512");
  }
  for (Capability c : {Capability::kAvx512, Capability::kAvx2}) {
    if (capability_supported(c)) return c;
  }
  return Capability::kDefault;
}
}  // namespace

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kDefault:
      return "default";
    case Capability::kAvx2:
      return "avx2";
    case Capability::kAvx512:
      return "avx512";
  }
  return "?";
}

bool capability_supported(Capability c) {
#ifdef FASTOPT_CPU_X86
  return cpu_has(c);
#else
  return c == Capability::kDefault;
#endif
}

Capability capability() {
  static const Capability chosen = choose();  // a throw leaves it unset: the next call tries again
  return chosen;
}

const Kernels& kernels() {
#ifdef FASTOPT_CPU_X86
  static const Kernels tables[] = {FASTOPT_KERNEL_TABLE(DEFAULT), FASTOPT_KERNEL_TABLE(AVX2),
                                   FASTOPT_KERNEL_TABLE(AVX512)};
#else
  static const Kernels tables[] = {FASTOPT_KERNEL_TABLE(DEFAULT)};
#endif
  return tables[static_cast<int>(capability())];
}

}  // namespace cpu
}  // namespace fastopt
