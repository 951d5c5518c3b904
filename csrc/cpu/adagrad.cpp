// fastopt::adagrad_ on CPU: Adagrad for every tensor of a group in one call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "dispatch.h"
#include "multi_tensor.h"
#include "step_scalars.h"

namespace fastopt {
namespace cpu {
namespace {

enum Slot { kParam, kGrad, kSum, kParamOut };

template <typename S, bool kMaster, bool kL2, typename T>
void adagrad_chunk(const Slots& sl, const Chunk& c, const AdagradScalars<T>& sc, const GradPrep<T>& gp) {
  using P = std::conditional_t<kMaster, float, S>;
  P* __restrict__ p = sl.ptr<P>(kParam, c.tensor) + c.begin;
  const S* __restrict__ g = sl.ptr<S>(kGrad, c.tensor) + c.begin;
  P* __restrict__ sum = sl.ptr<P>(kSum, c.tensor) + c.begin;
  S* __restrict__ out = kMaster ? sl.ptr<S>(kParamOut, c.tensor) + c.begin : nullptr;
  const int64_t n = c.end - c.begin;
  for (int64_t i = 0; i < n; ++i) {
    T si = static_cast<T>(sum[i]);
    const T gi = prep<T>(static_cast<T>(g[i]), gp);
    const T pi = adagrad_element<T, kL2>(static_cast<T>(p[i]), gi, si, sc);
    p[i] = static_cast<P>(pi);
    sum[i] = static_cast<P>(si);
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}

void adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                 at::TensorList steps, at::TensorList params_out, const at::Tensor& lr, double lr_decay,
                 double weight_decay, double eps, bool maximize, const c10::optional<at::Tensor>& inv_scale,
                 c10::optional<double> clip_value, const c10::optional<at::Tensor>& clip_coef,
                 const c10::optional<at::Tensor>& found_inf) {
  if (params.empty() || skip_step(found_inf)) return;
  TORCH_CHECK(steps.size() == params.size(), "adagrad_: one step count per param");
  const bool master = !params_out.empty();
  Slots sl({{"params", params}, {"grads", grads}, {"state_sums", state_sums}, {"params_out", params_out}},
           {true, false, true, true});
  const std::vector<double> t = increment_steps(steps);
  const Lr lr_(lr);
  dispatch_storage("adagrad_", grads[0].scalar_type(), params[0].scalar_type(), master, [&](auto s, auto kMaster) {
    using S = decltype(s);
    using T = typename ComputeType<S>::type;
    const GradPrep<T> gp = read_grad_prep<T>(inv_scale, clip_value, clip_coef, maximize);
    std::vector<AdagradScalars<T>> sc(t.size());
    for (size_t i = 0; i < t.size(); ++i) {
      sc[i] = {static_cast<T>(weight_decay), static_cast<T>(eps),
               static_cast<T>(-lr_.div(1.0 + (t[i] - 1.0) * lr_decay))};
    }
    const auto chunks = make_chunks(sl.numels());
    with_bool(weight_decay != 0, [&](auto kL2) {
      for_each_chunk(chunks, [&](int64_t, const Chunk& c) {
        adagrad_chunk<S, decltype(kMaster)::value, decltype(kL2)::value>(sl, c, sc[c.tensor], gp);
      });
    });
  });
  sl.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adagrad_", &adagrad_cpu);
}

}  // namespace cpu
}  // namespace fastopt
