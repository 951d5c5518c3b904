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

// A rule's update kernel of one capability.
template <typename R>
using UpdateKernel = void (*)(const UpdateArgs&, const typename R::Hyper&);

struct Kernels {
#define FASTOPT_KERNELS_FIELD(R) UpdateKernel<R> update_##R;
  FASTOPT_RULES(FASTOPT_KERNELS_FIELD)
#undef FASTOPT_KERNELS_FIELD
  decltype(&DEFAULT::norm_partials) norm_partials;
  decltype(&DEFAULT::bn_moment_sums) bn_moment_sums;
  decltype(&DEFAULT::bn_apply) bn_apply;
  decltype(&DEFAULT::bn_grad_sums) bn_grad_sums;
  decltype(&DEFAULT::bn_input_grad) bn_input_grad;

  // The update kernel of the rule whose hyperparameters these are.
#define FASTOPT_KERNELS_UPDATE(R) \
  void update(const UpdateArgs& u, const R::Hyper& h) const { update_##R(u, h); }
  FASTOPT_RULES(FASTOPT_KERNELS_UPDATE)
#undef FASTOPT_KERNELS_UPDATE
};

// The kernels of capability().
const Kernels& kernels();

}  // namespace cpu
}  // namespace fastopt
