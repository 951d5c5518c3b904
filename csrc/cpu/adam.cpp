// fastopt::adam_ on CPU: Adam/AdamW for every tensor of a group in one call, chunked across
// threads (multi_tensor.h), math from fastopt/update_math.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "dispatch.h"
#include "multi_tensor.h"
#include "step_scalars.h"

namespace fastopt {
namespace cpu {
namespace {

enum Slot { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kParamOut };

template <typename S, bool kMaster, bool kL2, bool kAmsgrad, typename T>
void adam_chunk(const Slots& sl, const Chunk& c, const AdamScalars<T>& sc, const GradPrep<T>& gp) {
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
    const T gi = prep<T>(static_cast<T>(g[i]), gp);
    const T pi = adam_element<T, kL2, kAmsgrad>(static_cast<T>(p[i]), gi, mi, vi, vmaxi, sc);
    p[i] = static_cast<P>(pi);
    m[i] = static_cast<P>(mi);
    v[i] = static_cast<P>(vi);
    if constexpr (kAmsgrad) vmax[i] = static_cast<P>(vmaxi);
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
              at::TensorList params_out, const at::Tensor& lr, double beta1, double beta2, double eps,
              double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
              const c10::optional<at::Tensor>& inv_scale, c10::optional<double> clip_value,
              const c10::optional<at::Tensor>& clip_coef, const c10::optional<at::Tensor>& found_inf) {
  if (params.empty() || skip_step(found_inf)) return;
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == params.size(),
              "adam_: amsgrad needs one max_exp_avg_sq per param");
  TORCH_CHECK(steps.size() == params.size(), "adam_: one step count per param");
  const bool master = !params_out.empty();
  Slots sl({{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
            {"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList()}, {"params_out", params_out}},
           {true, false, true, true, true, true});
  const std::vector<double> t = increment_steps(steps);
  const Lr lr_(lr);
  const bool l2 = weight_decay != 0 && !decoupled_weight_decay;
  const double decay = weight_decay != 0 && decoupled_weight_decay ? lr_.decay(weight_decay) : 1.0;

  dispatch_storage("adam_", grads[0].scalar_type(), params[0].scalar_type(), master, [&](auto s, auto kMaster) {
    using S = decltype(s);
    using T = typename ComputeType<S>::type;
    const GradPrep<T> gp = read_grad_prep<T>(inv_scale, clip_value, clip_coef, maximize);
    std::vector<AdamScalars<T>> sc(t.size());
    for (size_t i = 0; i < t.size(); ++i) {  // Note [scalars in float64]: torch's Python-float math
      const double bc1 = 1.0 - std::pow(beta1, t[i]);
      const double bc2 = 1.0 - std::pow(beta2, t[i]);
      sc[i] = {static_cast<T>(1.0 - beta1), static_cast<T>(beta2), static_cast<T>(1.0 - beta2),
               static_cast<T>(eps), static_cast<T>(weight_decay), static_cast<T>(decay),
               static_cast<T>(-lr_.div(bc1)), static_cast<T>(std::sqrt(bc2))};
    }
    const auto chunks = make_chunks(sl.numels());
    with_bool(l2, [&](auto kL2) {
      with_bool(amsgrad, [&](auto kAms) {
        for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
          adam_chunk<S, decltype(kMaster)::value, decltype(kL2)::value, decltype(kAms)::value>(
              sl, c, sc[c.tensor], gp);
        });
      });
    });
  });
  sl.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adam_", &adam_cpu);
}

}  // namespace cpu
}  // namespace fastopt
