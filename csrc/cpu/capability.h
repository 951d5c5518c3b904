// Which build of the CPU kernels runs (Note [capability kernels], kernels.h): the best this CPU
// supports, or the one FASTOPT_CPU_CAPABILITY names (default, avx2, avx512; a level the CPU lacks
// is refused with an error). Chosen once, at the first call (fastopt's import makes it).
#pragma once

#include "kernels.h"

namespace fastopt {
namespace cpu {

enum class Capability { kDefault, kAvx2, kAvx512 };

const char* capability_name(Capability c);
// Whether this build has the kernels of `c` and this CPU (and its OS) can run them.
bool capability_supported(Capability c);
Capability capability();

struct Kernels {
  decltype(&DEFAULT::adam) adam;
  decltype(&DEFAULT::adagrad) adagrad;
  decltype(&DEFAULT::rmsprop) rmsprop;
  decltype(&DEFAULT::norm_partials) norm_partials;
  decltype(&DEFAULT::bn_moment_sums) bn_moment_sums;
  decltype(&DEFAULT::bn_apply) bn_apply;
  decltype(&DEFAULT::bn_grad_sums) bn_grad_sums;
  decltype(&DEFAULT::bn_input_grad) bn_input_grad;
};

// The kernels of capability().
const Kernels& kernels();

}  // namespace cpu
}  // namespace fastopt
