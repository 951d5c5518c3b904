// fastopt::rmsprop_ on CPU: RMSprop (centered, momentum) for every tensor of a group in one call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fastopt/dispatch.h"
#include "ops.h"

namespace fastopt {
namespace cpu {

namespace {
enum Slot { kParam, kGrad, kSquareAvg, kGradAvg, kMomentumBuffer, kParamOut };

template <typename S, bool kMaster, bool kL2, bool kCentered, bool kMomentum, bool kPrep, typename T>
void rmsprop_chunk(const Slots& sl, const Chunk& c, const RMSpropScalars<T> sc, const GradPrep<T> gp) {
  using P = std::conditional_t<kMaster, float, S>;
  P* __restrict__ p = sl.ptr<P>(kParam, c.tensor) + c.begin;
  const S* __restrict__ g = sl.ptr<S>(kGrad, c.tensor) + c.begin;
  P* __restrict__ v = sl.ptr<P>(kSquareAvg, c.tensor) + c.begin;
  P* __restrict__ ga = kCentered ? sl.ptr<P>(kGradAvg, c.tensor) + c.begin : nullptr;
  P* __restrict__ buf = kMomentum ? sl.ptr<P>(kMomentumBuffer, c.tensor) + c.begin : nullptr;
  S* __restrict__ out = kMaster ? sl.ptr<S>(kParamOut, c.tensor) + c.begin : nullptr;
  const int64_t n = c.end - c.begin;
  for (int64_t i = 0; i < n; ++i) {
    T vi = static_cast<T>(v[i]);
    T gai = kCentered ? static_cast<T>(ga[i]) : T(0);
    T bufi = kMomentum ? static_cast<T>(buf[i]) : T(0);
    const T gi = prep<kPrep, T>(static_cast<T>(g[i]), gp);
    const T pi = rmsprop_element<T, kL2, kCentered, kMomentum>(static_cast<T>(p[i]), gi, vi, gai, bufi, sc);
    p[i] = static_cast<P>(pi);
    v[i] = static_cast<P>(vi);
    if constexpr (kCentered) ga[i] = static_cast<P>(gai);
    if constexpr (kMomentum) buf[i] = static_cast<P>(bufi);
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}
}  // namespace

std::shared_ptr<Slots> rmsprop_slots(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                                     at::TensorList grad_avgs, at::TensorList momentum_buffers,
                                     at::TensorList steps, at::TensorList params_out) {
  return std::make_shared<Slots>(
      std::vector<std::pair<const char*, at::TensorList>>{
          {"params", params}, {"grads", grads}, {"square_avgs", square_avgs}, {"grad_avgs", grad_avgs},
          {"momentum_buffers", momentum_buffers}, {"params_out", params_out}},
      std::vector<bool>{true, false, true, true, true, true}, steps);
}

void rmsprop_apply(const Slots& sl, const Lr& lr, const RMSpropArgs& a, const GradArgs& ga) {
  if (sl.size() == 0 || ga.skip()) return;
  TORCH_CHECK(!a.centered || sl.present(kGradAvg), "rmsprop_: centered needs grad_avgs");
  TORCH_CHECK(a.momentum <= 0 || sl.present(kMomentumBuffer), "rmsprop_: momentum needs momentum_buffers");
  sl.increment_steps();  // RMSprop keeps the count (torch does) but does not use it
  dispatch_storage("rmsprop_", sl.dtype(kGrad), sl.dtype(kParam), sl.present(kParamOut), [&](auto s, auto kMaster) {
    using S = decltype(s);
    using T = typename ComputeType<S>::type;
    const GradPrep<T> gp = ga.prep<T>(a.maximize);
    const RMSpropScalars<T> sc = rmsprop_scalars<T>({a.alpha, a.eps, a.weight_decay, a.momentum}, lr);
    with_bools(
        [&](auto kL2, auto kCentered, auto kMomentum, auto kPrep) {
          sl.for_each_active_chunk([&](const Chunk& c) {
            rmsprop_chunk<S, decltype(kMaster)::value, decltype(kL2)::value, decltype(kCentered)::value,
                          decltype(kMomentum)::value, decltype(kPrep)::value>(sl, c, sc, gp);
          });
        },
        a.weight_decay != 0, a.centered, a.momentum > 0, gp.active());
  });
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
