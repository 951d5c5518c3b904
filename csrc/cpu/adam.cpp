// fastopt::adam_ on CPU: Adam/AdamW for every tensor of a group in one call; the kernel is
// csrc/cpu/kernels/update.cpp's (one build per CPU capability), math from fastopt/update_math.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "capability.h"
#include "fastopt/dispatch.h"
#include "ops.h"

namespace fastopt {
namespace cpu {

using Sl = AdamSlots;

std::shared_ptr<Slots> adam_slots(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                  at::TensorList steps, at::TensorList params_out) {
  return std::make_shared<Slots>(
      std::vector<std::pair<const char*, at::TensorList>>{
          {"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
          {"max_exp_avg_sqs", max_exp_avg_sqs}, {"params_out", params_out}},
      std::vector<bool>{true, false, true, true, true, true}, steps);
}

void adam_apply(const Slots& sl, const Lr& lr, const AdamHyper& a, const GradArgs& ga) {
  if (sl.size() == 0 || ga.skip()) return;
  TORCH_CHECK(!a.amsgrad || sl.present(Sl::kMaxExpAvgSq), "adam_: amsgrad needs one max_exp_avg_sq per param");
  check_storage("adam_", sl.dtype(Sl::kGrad), sl.dtype(Sl::kParam), sl.present(Sl::kParamOut));
  const std::vector<double> t = sl.increment_steps();
  kernels().adam(sl.update_args(t, lr, ga.prep(a.maximize)), a);
}

namespace {
void adam_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
             at::TensorList params_out, const at::Tensor& lr, double beta1, double beta2, double eps,
             double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
             const c10::optional<at::Tensor>& inv_scale, c10::optional<double> clip_value,
             const c10::optional<at::Tensor>& clip_coef, const c10::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const GradArgs ga{inv_scale, clip_value, clip_coef, found_inf};
  if (ga.skip()) return;
  auto sl = adam_slots(params, grads, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList(),
                       steps, params_out);
  adam_apply(*sl, Lr(lr), {beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay}, ga);
  sl->finish();
}
}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adam_", &adam_op);
}

}  // namespace cpu
}  // namespace fastopt
