// The CPU update entry points: the dispatcher ops (lists in, as torch.compile traces them) and
// the planned variants for eager steps, which reuse a cached Slots (pointers, chunk table) and
// only rebind the gradients (Note [the plan cache]).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "multi_tensor.h"
#include "step_scalars.h"

namespace fastopt {
namespace cpu {

// Run one step over prepared slots (grads bound) through the capability kernels (kernels.h);
// they increment the step counts.
void adam_apply(const Slots& sl, const Lr& lr, const AdamHyper& a, const GradArgs& g);
void adagrad_apply(const Slots& sl, const Lr& lr, const AdagradHyper& a, const GradArgs& g);
void rmsprop_apply(const Slots& sl, const Lr& lr, const RMSpropHyper& a, const GradArgs& g);

// Slot builders, in each op's slot order.
std::shared_ptr<Slots> adam_slots(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                  at::TensorList steps, at::TensorList params_out);
std::shared_ptr<Slots> adagrad_slots(at::TensorList params, at::TensorList grads, at::TensorList sums,
                                     at::TensorList steps, at::TensorList params_out);
std::shared_ptr<Slots> rmsprop_slots(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                                     at::TensorList grad_avgs, at::TensorList momentum_buffers,
                                     at::TensorList steps, at::TensorList params_out);

// The norm (2.0 or inf) of the gradients bound in `sl`, after unscale and the value clip.
at::Tensor grad_norm(const Slots& sl, size_t slot, double norm_type, const c10::optional<at::Tensor>& inv_scale,
                     c10::optional<double> clip_value);

}  // namespace cpu
}  // namespace fastopt
