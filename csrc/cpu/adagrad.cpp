// fastopt::adagrad_ on CPU: Adagrad for every tensor of a group in one call (the kernel:
// csrc/cpu/kernels/update.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "capability.h"
#include "fastopt/dispatch.h"
#include "ops.h"

namespace fastopt {
namespace cpu {

using Sl = AdagradSlots;

std::shared_ptr<Slots> adagrad_slots(at::TensorList params, at::TensorList grads, at::TensorList sums,
                                     at::TensorList steps, at::TensorList params_out) {
  return std::make_shared<Slots>(
      std::vector<std::pair<const char*, at::TensorList>>{
          {"params", params}, {"grads", grads}, {"state_sums", sums}, {"params_out", params_out}},
      std::vector<bool>{true, false, true, true}, steps);
}

void adagrad_apply(const Slots& sl, const Lr& lr, const AdagradHyper& a, const GradArgs& ga) {
  if (sl.size() == 0 || ga.skip()) return;
  check_storage("adagrad_", sl.dtype(Sl::kGrad), sl.dtype(Sl::kParam), sl.present(Sl::kParamOut));
  const std::vector<double> t = sl.increment_steps();
  kernels().adagrad(sl.update_args(t, lr, ga.prep(a.maximize)), a);
}

namespace {
void adagrad_op(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                at::TensorList steps, at::TensorList params_out, const at::Tensor& lr, double lr_decay,
                double weight_decay, double eps, bool maximize, const c10::optional<at::Tensor>& inv_scale,
                c10::optional<double> clip_value, const c10::optional<at::Tensor>& clip_coef,
                const c10::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const GradArgs ga{inv_scale, clip_value, clip_coef, found_inf};
  if (ga.skip()) return;
  auto sl = adagrad_slots(params, grads, state_sums, steps, params_out);
  adagrad_apply(*sl, Lr(lr), {lr_decay, weight_decay, eps, maximize}, ga);
  sl->finish();
}
}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adagrad_", &adagrad_op);
}

}  // namespace cpu
}  // namespace fastopt
