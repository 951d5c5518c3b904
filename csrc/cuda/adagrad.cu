// Adagrad on CUDA: one launch for every tensor of a group (engine.cuh), math from
// fastopt/update_math.h (adagrad_element), lr / (1 + (t - 1) * lr_decay) from each step count.
#include <torch/library.h>

#include "engine.cuh"

namespace fastopt {
namespace cuda {

namespace {
enum Slot { kParam, kGrad, kSum, kParamOut };

struct AdagradParams {
  AdagradHyper hyper;
  DeviceLr lr;
  DeviceGradArgs ga;
};

template <typename S, bool kMaster, bool kL2, bool kPrep>
struct AdagradChunk {
  using T = compute_t<S>;
  using P = std::conditional_t<kMaster, float, S>;
  P* p;
  const S* g;
  P* sum;
  S* out;
  AdagradScalars<T> sc;
  GradPrep<T> gp;

  __device__ AdagradChunk(const Tables& tb, int32_t t, float step, const AdagradParams& prm)
      : p(tb.slot<P>(kParam, t)),
        g(tb.slot<const S>(kGrad, t)),
        sum(tb.slot<P>(kSum, t)),
        out(kMaster ? tb.slot<S>(kParamOut, t) : nullptr),
        sc(adagrad_scalars<T>(prm.hyper, prm.lr.read(), static_cast<double>(step))),
        gp(prm.ga.read<T>()) {}

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) {
    T rp[N], rg[N], rs[N];
    load<N>(p, i, rp);
    load<N>(g, i, rg);
    load<N>(sum, i, rs);
#pragma unroll
    for (int k = 0; k < N; ++k) rp[k] = adagrad_element<T, kL2>(rp[k], prep<kPrep, T>(rg[k], gp), rs[k], sc);
    store<N>(p, i, rp);
    store<N>(sum, i, rs);
    if constexpr (kMaster) store<N>(out, i, rp);
  }
};
}  // namespace

void adagrad_step(const CudaPlan& plan, const CudaLr& lr, const AdagradHyper& f, const CudaGradArgs& g) {
  if (plan.size() == 0) return;
  const AdagradParams prm{f, device_lr(lr, plan.device()),
                          device_grad_args(g, f.maximize, plan.device())};
  dispatch_storage("adagrad_", plan.dtype(kGrad), plan.dtype(kParam), plan.present(kParamOut),
                   [&](auto s, auto kMaster) {
                     using S = decltype(s);
                     with_bools(
                         [&](auto kL2, auto kPrep) {
                           launch_update<AdagradChunk<S, decltype(kMaster)::value, decltype(kL2)::value,
                                                      decltype(kPrep)::value>>(plan, prm);
                         },
                         f.weight_decay != 0, prm.ga.active());
                   });
}

std::shared_ptr<CudaPlan> adagrad_plan(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                       const std::vector<at::Tensor>& sums, const std::vector<at::Tensor>& steps,
                                       const std::vector<at::Tensor>& params_out, std::vector<at::Tensor> owners) {
  return std::make_shared<CudaPlan>(
      std::vector<std::pair<const char*, std::vector<at::Tensor>>>{
          {"params", params}, {"grads", grads}, {"state_sums", sums}, {"params_out", params_out}},
      kGrad, steps, std::move(owners));
}

namespace {
void adagrad_op(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
                at::TensorList params_out, const at::Tensor& lr, double lr_decay, double weight_decay, double eps,
                bool maximize, const c10::optional<at::Tensor>& inv_scale, c10::optional<double> clip_value,
                const c10::optional<at::Tensor>& clip_coef, const c10::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  auto plan = adagrad_plan(params.vec(), grads.vec(), state_sums.vec(), steps.vec(), params_out.vec(), {});
  adagrad_step(*plan, list_op_lr(lr, plan->device()), {lr_decay, weight_decay, eps, maximize},
               {inv_scale, clip_value, clip_coef, found_inf, /*scale_is_inverse=*/true});
}
}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("adagrad_", &adagrad_op);
}

}  // namespace cuda
}  // namespace fastopt
