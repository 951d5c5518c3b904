// fastopt::rmsprop_ on CPU: RMSprop (centered, momentum) for every tensor of a group in one call
// (the kernel: csrc/cpu/kernels/update.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "capability.h"
#include "fastopt/dispatch.h"
#include "ops.h"

namespace fastopt {
namespace cpu {

using Sl = RMSpropSlots;

std::shared_ptr<Slots> rmsprop_slots(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                                     at::TensorList grad_avgs, at::TensorList momentum_buffers,
                                     at::TensorList steps, at::TensorList params_out) {
  return std::make_shared<Slots>(
      std::vector<std::pair<const char*, at::TensorList>>{
          {"params", params}, {"grads", grads}, {"square_avgs", square_avgs}, {"grad_avgs", grad_avgs},
          {"momentum_buffers", momentum_buffers}, {"params_out", params_out}},
      std::vector<bool>{true, false, true, true, true, true}, steps);
}

void rmsprop_apply(const Slots& sl, const Lr& lr, const RMSpropHyper& a, const GradArgs& ga) {
  if (sl.size() == 0 || ga.skip()) return;
  TORCH_CHECK(!a.centered || sl.present(Sl::kGradAvg), "rmsprop_: centered needs grad_avgs");
  TORCH_CHECK(a.momentum <= 0 || sl.present(Sl::kMomentumBuffer), "rmsprop_: momentum needs momentum_buffers");
  check_storage("rmsprop_", sl.dtype(Sl::kGrad), sl.dtype(Sl::kParam), sl.present(Sl::kParamOut));
  const std::vector<double> t = sl.increment_steps();  // RMSprop keeps the count (torch does) but does not use it
  kernels().rmsprop(sl.update_args(t, lr, ga.prep(a.maximize)), a);
}

namespace {
void rmsprop_op(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
                at::TensorList params_out, const at::Tensor& lr, double alpha, double eps,
                double weight_decay, double momentum, bool centered, bool maximize,
                const c10::optional<at::Tensor>& inv_scale, c10::optional<double> clip_value,
                const c10::optional<at::Tensor>& clip_coef, const c10::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const GradArgs ga{inv_scale, clip_value, clip_coef, found_inf};
  if (ga.skip()) return;
  auto sl = rmsprop_slots(params, grads, square_avgs, centered ? grad_avgs : at::TensorList(),
                          momentum > 0 ? momentum_buffers : at::TensorList(), steps, params_out);
  rmsprop_apply(*sl, Lr(lr), {alpha, eps, weight_decay, momentum, centered, maximize}, ga);
  sl->finish();
}
}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("rmsprop_", &rmsprop_op);
}

}  // namespace cpu
}  // namespace fastopt
