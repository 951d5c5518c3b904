// Adam/AdamW on CUDA: one launch for every tensor of a group (engine.cuh), math from
// fastopt/update_math.h (adam_element), per-step scalars computed on the device from each
// tensor's step count (adam_scalars, in double).
#include <torch/library.h>

#include "engine.cuh"

namespace fastopt {
namespace cuda {

namespace {
enum Slot { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kParamOut };

struct AdamParams {
  AdamHyper hyper;
  DeviceLr lr;
  DeviceGradArgs ga;
};

// S: grad storage; P: param and state storage (float32 with master weights); T: compute type.
template <typename S, bool kMaster, bool kL2, bool kAmsgrad, bool kPrep>
struct AdamChunk {
  using T = compute_t<S>;
  using P = std::conditional_t<kMaster, float, S>;
  P* p;
  const S* g;
  P* m;
  P* v;
  P* vmax;
  S* out;
  AdamScalars<T> sc;
  GradPrep<T> gp;

  __device__ AdamChunk(const Tables& tb, int32_t t, float step, const AdamParams& prm)
      : p(tb.slot<P>(kParam, t)),
        g(tb.slot<const S>(kGrad, t)),
        m(tb.slot<P>(kExpAvg, t)),
        v(tb.slot<P>(kExpAvgSq, t)),
        vmax(kAmsgrad ? tb.slot<P>(kMaxExpAvgSq, t) : nullptr),
        out(kMaster ? tb.slot<S>(kParamOut, t) : nullptr),
        sc(adam_scalars<T>(prm.hyper, prm.lr.read(), static_cast<double>(step))),
        gp(prm.ga.read<T>()) {}

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) {
    T rp[N], rg[N], rm[N], rv[N], rvmax[N];
    load<N>(p, i, rp);
    load<N>(g, i, rg);
    load<N>(m, i, rm);
    load<N>(v, i, rv);
    if constexpr (kAmsgrad) load<N>(vmax, i, rvmax);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      rp[k] = adam_element<T, kL2, kAmsgrad>(rp[k], prep<kPrep, T>(rg[k], gp), rm[k], rv[k], rvmax[k], sc);
    }
    store<N>(p, i, rp);
    store<N>(m, i, rm);
    store<N>(v, i, rv);
    if constexpr (kAmsgrad) store<N>(vmax, i, rvmax);
    if constexpr (kMaster) store<N>(out, i, rp);
  }
};
}  // namespace

void adam_step(const CudaPlan& plan, const CudaLr& lr, const AdamHyper& f, const CudaGradArgs& g) {
  if (plan.size() == 0) return;
  TORCH_CHECK(!f.amsgrad || plan.present(kMaxExpAvgSq), "adam_: amsgrad needs one max_exp_avg_sq per param");
  const AdamParams prm{f, device_lr(lr, plan.device()),
                       device_grad_args(g, f.maximize, plan.device())};
  const bool l2 = f.weight_decay != 0 && !f.decoupled;
  dispatch_storage("adam_", plan.dtype(kGrad), plan.dtype(kParam), plan.present(kParamOut), [&](auto s, auto kMaster) {
    using S = decltype(s);
    with_bools(
        [&](auto kL2, auto kAms, auto kPrep) {
          launch_update<AdamChunk<S, decltype(kMaster)::value, decltype(kL2)::value, decltype(kAms)::value,
                                  decltype(kPrep)::value>>(plan, prm);
        },
        l2, f.amsgrad, prm.ga.active());
  });
}

std::shared_ptr<CudaPlan> adam_plan(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                                    const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& steps,
                                    const std::vector<at::Tensor>& params_out, std::vector<at::Tensor> owners) {
  return std::make_shared<CudaPlan>(
      std::vector<std::pair<const char*, std::vector<at::Tensor>>>{
          {"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
          {"max_exp_avg_sqs", max_exp_avg_sqs}, {"params_out", params_out}},
      kGrad, steps, std::move(owners));
}

namespace {
// torch.ops.fastopt.adam_ on CUDA tensors: a one-off plan (what torch.compile calls).
void adam_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
             at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList params_out, const at::Tensor& lr,
             double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
             bool decoupled_weight_decay, const c10::optional<at::Tensor>& inv_scale, c10::optional<double> clip_value,
             const c10::optional<at::Tensor>& clip_coef, const c10::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  auto plan = adam_plan(params.vec(), grads.vec(), exp_avgs.vec(), exp_avg_sqs.vec(),
                        amsgrad ? max_exp_avg_sqs.vec() : std::vector<at::Tensor>{}, steps.vec(), params_out.vec(), {});
  adam_step(*plan, list_op_lr(lr, plan->device()),
            {beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay},
            {inv_scale, clip_value, clip_coef, found_inf, /*scale_is_inverse=*/true});
}
}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("adam_", &adam_op);
}

}  // namespace cuda
}  // namespace fastopt
