// RMSprop (centered, momentum) on CUDA: one launch for every tensor of a group (engine.cuh), math
// from fastopt/update_math.h (rmsprop_element).
#include <torch/library.h>

#include "engine.cuh"

namespace fastopt {
namespace cuda {

namespace {
enum Slot { kParam, kGrad, kSquareAvg, kGradAvg, kMomentumBuffer, kParamOut };

struct RMSpropParams {
  RMSpropHyper hyper;
  DeviceLr lr;
  DeviceGradArgs ga;
};

template <typename S, bool kMaster, bool kL2, bool kCentered, bool kMomentum, bool kPrep>
struct RMSpropChunk {
  using T = compute_t<S>;
  using P = std::conditional_t<kMaster, float, S>;
  P* p;
  const S* g;
  P* v;
  P* ga;
  P* buf;
  S* out;
  RMSpropScalars<T> sc;
  GradPrep<T> gp;

  __device__ RMSpropChunk(const Tables& tb, int32_t t, float /*step*/, const RMSpropParams& prm)
      : p(tb.slot<P>(kParam, t)),
        g(tb.slot<const S>(kGrad, t)),
        v(tb.slot<P>(kSquareAvg, t)),
        ga(kCentered ? tb.slot<P>(kGradAvg, t) : nullptr),
        buf(kMomentum ? tb.slot<P>(kMomentumBuffer, t) : nullptr),
        out(kMaster ? tb.slot<S>(kParamOut, t) : nullptr),
        sc(rmsprop_scalars<T>(prm.hyper, prm.lr.read())),
        gp(prm.ga.read<T>()) {}

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) {
    T rp[N], rg[N], rv[N], rga[N], rbuf[N];
    load<N>(p, i, rp);
    load<N>(g, i, rg);
    load<N>(v, i, rv);
    if constexpr (kCentered) load<N>(ga, i, rga);
    if constexpr (kMomentum) load<N>(buf, i, rbuf);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      rp[k] = rmsprop_element<T, kL2, kCentered, kMomentum>(rp[k], prep<kPrep, T>(rg[k], gp), rv[k], rga[k], rbuf[k],
                                                            sc);
    }
    store<N>(p, i, rp);
    store<N>(v, i, rv);
    if constexpr (kCentered) store<N>(ga, i, rga);
    if constexpr (kMomentum) store<N>(buf, i, rbuf);
    if constexpr (kMaster) store<N>(out, i, rp);
  }
};
}  // namespace

void rmsprop_step(const CudaPlan& plan, const CudaLr& lr, const RMSpropHyper& f, const CudaGradArgs& g) {
  if (plan.size() == 0) return;
  TORCH_CHECK(!f.centered || plan.present(kGradAvg), "rmsprop_: centered needs grad_avgs");
  TORCH_CHECK(f.momentum <= 0 || plan.present(kMomentumBuffer), "rmsprop_: momentum needs momentum_buffers");
  const RMSpropParams prm{f, device_lr(lr, plan.device()),
                          device_grad_args(g, f.maximize, plan.device())};
  dispatch_storage("rmsprop_", plan.dtype(kGrad), plan.dtype(kParam), plan.present(kParamOut),
                   [&](auto s, auto kMaster) {
                     using S = decltype(s);
                     with_bools(
                         [&](auto kL2, auto kCentered, auto kMomentum, auto kPrep) {
                           launch_update<RMSpropChunk<S, decltype(kMaster)::value, decltype(kL2)::value,
                                                      decltype(kCentered)::value, decltype(kMomentum)::value,
                                                      decltype(kPrep)::value>>(plan, prm);
                         },
                         f.weight_decay != 0, f.centered, f.momentum > 0, prm.ga.active());
                   });
}

std::shared_ptr<CudaPlan> rmsprop_plan(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                       const std::vector<at::Tensor>& square_avgs,
                                       const std::vector<at::Tensor>& grad_avgs,
                                       const std::vector<at::Tensor>& momentum_buffers,
                                       const std::vector<at::Tensor>& steps,
                                       const std::vector<at::Tensor>& params_out, std::vector<at::Tensor> owners) {
  return std::make_shared<CudaPlan>(
      std::vector<std::pair<const char*, std::vector<at::Tensor>>>{
          {"params", params}, {"grads", grads}, {"square_avgs", square_avgs}, {"grad_avgs", grad_avgs},
          {"momentum_buffers", momentum_buffers}, {"params_out", params_out}},
      kGrad, steps, std::move(owners));
}

namespace {
void rmsprop_op(at::TensorList params, at::TensorList grads, at::TensorList square_avgs, at::TensorList grad_avgs,
                at::TensorList momentum_buffers, at::TensorList steps, at::TensorList params_out,
                const at::Tensor& lr, double alpha, double eps, double weight_decay, double momentum, bool centered,
                bool maximize, const c10::optional<at::Tensor>& inv_scale, c10::optional<double> clip_value,
                const c10::optional<at::Tensor>& clip_coef, const c10::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  auto plan = rmsprop_plan(params.vec(), grads.vec(), square_avgs.vec(),
                           centered ? grad_avgs.vec() : std::vector<at::Tensor>{},
                           momentum > 0 ? momentum_buffers.vec() : std::vector<at::Tensor>{}, steps.vec(),
                           params_out.vec(), {});
  rmsprop_step(*plan, list_op_lr(lr, plan->device()), {alpha, eps, weight_decay, momentum, centered, maximize},
               {inv_scale, clip_value, clip_coef, found_inf, /*scale_is_inverse=*/true});
}
}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("rmsprop_", &rmsprop_op);
}

}  // namespace cuda
}  // namespace fastopt
