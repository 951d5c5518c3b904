// fastopt::adagrad_ on CPU: Adagrad for every tensor of a group in one call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastopt/dispatch.h"
#include "ops.h"

namespace fastopt {
namespace cpu {

namespace {
enum Slot { kParam, kGrad, kSum, kParamOut };

template <typename S, bool kMaster, bool kL2, bool kPrep, typename T>
void adagrad_chunk(const Slots& sl, const Chunk& c, const AdagradScalars<T> sc, const GradPrep<T> gp) {
  using P = std::conditional_t<kMaster, float, S>;
  P* __restrict__ p = sl.ptr<P>(kParam, c.tensor) + c.begin;
  const S* __restrict__ g = sl.ptr<S>(kGrad, c.tensor) + c.begin;
  P* __restrict__ sum = sl.ptr<P>(kSum, c.tensor) + c.begin;
  S* __restrict__ out = kMaster ? sl.ptr<S>(kParamOut, c.tensor) + c.begin : nullptr;
  const int64_t n = c.end - c.begin;
  for (int64_t i = 0; i < n; ++i) {
    T si = static_cast<T>(sum[i]);
    const T gi = prep<kPrep, T>(static_cast<T>(g[i]), gp);
    const T pi = adagrad_element<T, kL2>(static_cast<T>(p[i]), gi, si, sc);
    p[i] = static_cast<P>(pi);
    sum[i] = static_cast<P>(si);
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}
}  // namespace

std::shared_ptr<Slots> adagrad_slots(at::TensorList params, at::TensorList grads, at::TensorList sums,
                                     at::TensorList steps, at::TensorList params_out) {
  return std::make_shared<Slots>(
      std::vector<std::pair<const char*, at::TensorList>>{
          {"params", params}, {"grads", grads}, {"state_sums", sums}, {"params_out", params_out}},
      std::vector<bool>{true, false, true, true}, steps);
}

void adagrad_apply(const Slots& sl, const Lr& lr, const AdagradArgs& a, const GradArgs& ga) {
  if (sl.size() == 0 || ga.skip()) return;
  const std::vector<double> t = sl.increment_steps();
  dispatch_storage("adagrad_", sl.dtype(kGrad), sl.dtype(kParam), sl.present(kParamOut), [&](auto s, auto kMaster) {
    using S = decltype(s);
    using T = typename ComputeType<S>::type;
    const GradPrep<T> gp = ga.prep<T>(a.maximize);
    const AdagradHyper hyper{a.lr_decay, a.weight_decay, a.eps};
    const auto sc =
        per_step_scalars<AdagradScalars<T>>(t, [&](double step) { return adagrad_scalars<T>(hyper, lr, step); });
    with_bools(
        [&](auto kL2, auto kPrep) {
          sl.for_each_active_chunk([&](const Chunk& c) {
            adagrad_chunk<S, decltype(kMaster)::value, decltype(kL2)::value, decltype(kPrep)::value>(
                sl, c, sc[c.tensor], gp);
          });
        },
        a.weight_decay != 0, gp.active());
  });
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
