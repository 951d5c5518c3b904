// The CPU update entry points: the dispatcher ops (lists in, as torch.compile traces them) and
// the planned variants for eager steps, which reuse a cached Slots (pointers, chunk table) and
// only rebind the gradients (Note [the plan cache]).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "fastopt/update_op.h"
#include "multi_tensor.h"
#include "step_scalars.h"

namespace fastopt {
namespace cpu {

// A plan of rule R's lists (fastopt/update_op.h: params, grads, R's state lists, params_out) and
// their step counts, stored as `rounding` says (fastopt/update_op.h).
template <typename R>
std::shared_ptr<Slots> make_slots(const SlotLists& lists, at::TensorList steps, Rounding rounding = {});

// One step over prepared slots (grads bound) through the capability kernels (kernels.h); increments
// the step counts. Both are instantiated for every rule of FASTOPT_RULES (update.cpp).
template <typename R>
void apply(const Slots& sl, const Lr& lr, const typename R::Hyper& h, const GradArgs& g);

// The norm (2.0 or inf) of the gradients bound in `sl`, after unscale and the value clip.
at::Tensor grad_norm(const Slots& sl, size_t slot, double norm_type, const c10::optional<at::Tensor>& inv_scale,
                     c10::optional<double> clip_value);

}  // namespace cpu
}  // namespace fastopt
