// fastopt::rmsprop_ on CPU: RMSprop (centered, momentum) for every tensor of a group in one call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "dispatch.h"
#include "multi_tensor.h"
#include "step_scalars.h"

namespace fastopt {
namespace cpu {
namespace {

enum Slot { kParam, kGrad, kSquareAvg, kGradAvg, kMomentumBuffer, kParamOut };

template <typename S, bool kMaster, bool kL2, bool kCentered, bool kMomentum, typename T>
void rmsprop_chunk(const Slots& sl, const Chunk& c, const RMSpropScalars<T>& sc, const GradPrep<T>& gp) {
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
    const T gi = prep<T>(static_cast<T>(g[i]), gp);
    const T pi = rmsprop_element<T, kL2, kCentered, kMomentum>(static_cast<T>(p[i]), gi, vi, gai, bufi, sc);
    p[i] = static_cast<P>(pi);
    v[i] = static_cast<P>(vi);
    if constexpr (kCentered) ga[i] = static_cast<P>(gai);
    if constexpr (kMomentum) buf[i] = static_cast<P>(bufi);
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}

void rmsprop_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                 at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
                 at::TensorList params_out, const at::Tensor& lr, double alpha, double eps,
                 double weight_decay, double momentum, bool centered, bool maximize,
                 const c10::optional<at::Tensor>& inv_scale, c10::optional<double> clip_value,
                 const c10::optional<at::Tensor>& clip_coef, const c10::optional<at::Tensor>& found_inf) {
  if (params.empty() || skip_step(found_inf)) return;
  TORCH_CHECK(steps.size() == params.size(), "rmsprop_: one step count per param");
  TORCH_CHECK(!centered || grad_avgs.size() == params.size(), "rmsprop_: centered needs grad_avgs");
  TORCH_CHECK(momentum <= 0 || momentum_buffers.size() == params.size(),
              "rmsprop_: momentum needs momentum_buffers");
  const bool master = !params_out.empty();
  Slots sl({{"params", params}, {"grads", grads}, {"square_avgs", square_avgs},
            {"grad_avgs", centered ? grad_avgs : at::TensorList()},
            {"momentum_buffers", momentum > 0 ? momentum_buffers : at::TensorList()},
            {"params_out", params_out}},
           {true, false, true, true, true, true});
  increment_steps(steps);  // RMSprop keeps the count (torch does) but does not use it
  const Lr lr_(lr);
  dispatch_storage("rmsprop_", grads[0].scalar_type(), params[0].scalar_type(), master, [&](auto s, auto kMaster) {
    using S = decltype(s);
    using T = typename ComputeType<S>::type;
    const GradPrep<T> gp = read_grad_prep<T>(inv_scale, clip_value, clip_coef, maximize);
    const RMSpropScalars<T> sc{static_cast<T>(alpha), static_cast<T>(1.0 - alpha), static_cast<T>(eps),
                               static_cast<T>(weight_decay), static_cast<T>(momentum),
                               static_cast<T>(-lr_.value)};
    const auto chunks = make_chunks(sl.numels());
    with_bool(weight_decay != 0, [&](auto kL2) {
      with_bool(centered, [&](auto kCentered) {
        with_bool(momentum > 0, [&](auto kMomentum) {
          for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
            rmsprop_chunk<S, decltype(kMaster)::value, decltype(kL2)::value, decltype(kCentered)::value,
                          decltype(kMomentum)::value>(sl, c, sc, gp);
          });
        });
      });
    });
  });
  sl.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("rmsprop_", &rmsprop_cpu);
}

}  // namespace cpu
}  // namespace fastopt
