// fastopt::adam_ on CPU: Adam/AdamW for every tensor of a group in one call, chunked across
// threads (multi_tensor.h), math from fastopt/update_math.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "fastopt/dispatch.h"
#include "ops.h"

namespace fastopt {
namespace cpu {

namespace {
enum Slot { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kParamOut };

template <typename S, bool kMaster, bool kL2, bool kAmsgrad, bool kPrep, typename T>
void adam_chunk(const Slots& sl, const Chunk& c, const AdamScalars<T> sc, const GradPrep<T> gp) {
  using P = std::conditional_t<kMaster, float, S>;  // storage of params (masters) and state
  P* __restrict__ p = sl.ptr<P>(kParam, c.tensor) + c.begin;
  const S* __restrict__ g = sl.ptr<S>(kGrad, c.tensor) + c.begin;
  P* __restrict__ m = sl.ptr<P>(kExpAvg, c.tensor) + c.begin;
  P* __restrict__ v = sl.ptr<P>(kExpAvgSq, c.tensor) + c.begin;
  P* __restrict__ vmax = kAmsgrad ? sl.ptr<P>(kMaxExpAvgSq, c.tensor) + c.begin : nullptr;
  S* __restrict__ out = kMaster ? sl.ptr<S>(kParamOut, c.tensor) + c.begin : nullptr;
  const int64_t n = c.end - c.begin;
  for (int64_t i = 0; i < n; ++i) {
    T mi = static_cast<T>(m[i]);
    T vi = static_cast<T>(v[i]);
    T vmaxi = kAmsgrad ? static_cast<T>(vmax[i]) : T(0);
    const T gi = prep<kPrep, T>(static_cast<T>(g[i]), gp);
    const T pi = adam_element<T, kL2, kAmsgrad>(static_cast<T>(p[i]), gi, mi, vi, vmaxi, sc);
    p[i] = static_cast<P>(pi);
    m[i] = static_cast<P>(mi);
    v[i] = static_cast<P>(vi);
    if constexpr (kAmsgrad) vmax[i] = static_cast<P>(vmaxi);
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}
}  // namespace

std::shared_ptr<Slots> adam_slots(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                  at::TensorList steps, at::TensorList params_out) {
  return std::make_shared<Slots>(
      std::vector<std::pair<const char*, at::TensorList>>{
          {"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
          {"max_exp_avg_sqs", max_exp_avg_sqs}, {"params_out", params_out}},
      std::vector<bool>{true, false, true, true, true, true}, steps);
}

void adam_apply(const Slots& sl, const Lr& lr, const AdamArgs& a, const GradArgs& ga) {
  if (sl.size() == 0 || ga.skip()) return;
  TORCH_CHECK(!a.amsgrad || sl.present(kMaxExpAvgSq), "adam_: amsgrad needs one max_exp_avg_sq per param");
  const std::vector<double> t = sl.increment_steps();
  const bool l2 = a.weight_decay != 0 && !a.decoupled_weight_decay;
  const AdamHyper hyper{a.beta1, a.beta2, a.eps, a.weight_decay, a.decoupled_weight_decay};
  dispatch_storage("adam_", sl.dtype(kGrad), sl.dtype(kParam), sl.present(kParamOut), [&](auto s, auto kMaster) {
    using S = decltype(s);
    using T = typename ComputeType<S>::type;
    const GradPrep<T> gp = ga.prep<T>(a.maximize);
    const auto sc = per_step_scalars<AdamScalars<T>>(t, [&](double step) { return adam_scalars<T>(hyper, lr, step); });
    with_bools(
        [&](auto kL2, auto kAms, auto kPrep) {
          sl.for_each_active_chunk([&](const Chunk& c) {
            adam_chunk<S, decltype(kMaster)::value, decltype(kL2)::value, decltype(kAms)::value,
                       decltype(kPrep)::value>(sl, c, sc[c.tensor], gp);
          });
        },
        l2, a.amsgrad, gp.active());
  });
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
