// The update kernel of every rule on CUDA (Note [a rule in C++], fastopt/update_math.h): one
// launch for every tensor of a group (engine.cuh), per-step scalars computed on the device from
// each tensor's step count (R::scalars, in double), the element math R::update.
#include <torch/library.h>

#include "engine.cuh"
#include "fastopt/update_op.h"

namespace fastopt {
namespace cuda {

namespace {
template <typename R>
struct UpdateParams {
  typename R::Hyper hyper;
  DeviceLr lr;
  DeviceGradArgs ga;
};

// One chunk of rule R. S: grad storage; P: param and state storage (float32 with master weights);
// T: compute type; kF: the rule's flags (which state slots are walked, which branches run).
template <typename R, typename S, bool kMaster, unsigned kF, bool kPrep>
struct UpdateChunk {
  using T = compute_t<S>;
  using P = std::conditional_t<kMaster, float, S>;
  static constexpr int kStates = R::kStates;
  P* p;
  const S* g;
  P* s[kStates];  // nullptr for a slot the flags do not use
  S* out;
  typename R::template Scalars<T> sc;
  GradPrep<T> gp;

  __device__ UpdateChunk(const Tables& tb, int32_t t, float step, const UpdateParams<R>& prm)
      : p(tb.slot<P>(kParamSlot, t)),
        g(tb.slot<const S>(kGradSlot, t)),
        out(kMaster ? tb.slot<S>(params_out_slot<R>(), t) : nullptr),
        sc(R::template scalars<T>(prm.hyper, prm.lr.read(), static_cast<double>(step))),
        gp(prm.ga.template read<T>()) {
#pragma unroll
    for (int k = 0; k < kStates; ++k) s[k] = R::uses(kF, k) ? tb.slot<P>(2 + k, t) : nullptr;
  }

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) {
    T rp[N], rg[N], rs[kStates][N];
    load<N>(p, i, rp);
    load<N>(g, i, rg);
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      if (R::uses(kF, k)) load<N>(s[k], i, rs[k]);
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      T st[kStates] = {};
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        if (R::uses(kF, k)) st[k] = rs[k][e];
      }
      rp[e] = R::template update<kF>(rp[e], prep<kPrep, T>(rg[e], gp), st, sc);
#pragma unroll
      for (int k = 0; k < kStates; ++k) rs[k][e] = st[k];
    }
    store<N>(p, i, rp);
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      if (R::uses(kF, k)) store<N>(s[k], i, rs[k]);
    }
    if constexpr (kMaster) store<N>(out, i, rp);
  }
};
}  // namespace

template <typename R>
void step(const CudaPlan& plan, const CudaLr& lr, const typename R::Hyper& h, const GradArgs& g) {
  if (plan.size() == 0) return;
  check_states<R>(h, [&](size_t s) { return plan.present(s); });
  const UpdateParams<R> prm{h, device_lr(lr, plan.device()), device_grad_args(g, h.maximize, plan.device())};
  dispatch_storage(op_name<R>().c_str(), plan.dtype(kGradSlot), plan.dtype(kParamSlot),
                   plan.present(params_out_slot<R>()), [&](auto s, auto kMaster) {
                     using S = decltype(s);
                     with_flags<R::kFlagBits>(R::flags(h), [&](auto kF) {
                       with_bool(prm.ga.active(), [&](auto kPrep) {
                         launch_update<UpdateChunk<R, S, decltype(kMaster)::value, decltype(kF)::value,
                                                   decltype(kPrep)::value>>(plan, prm);
                       });
                     });
                   });
}

namespace {
// torch.ops.fastopt.<rule>_ on CUDA tensors: a one-off plan (what torch.compile calls).
template <typename R>
void update_op(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  const UpdateOpArgs<R> a = pop_update_args<R>(*stack);
  if (a.slots[kParamSlot].second.empty()) return;
  TORCH_CHECK(!a.rounding.stochastic() && a.rounding.param == ParamStore::kNearest && a.rounding.seeds.empty(),
              "fastopt (cuda): ", op_name<R>(), " does not store stochastically (seeds, stochastic_state) or with "
              "compensation yet; the reference rules do");
  const CudaPlan plan(a.slots, a.steps, {});
  step<R>(plan, list_op_lr(a.lr, plan.device()), a.hyper, a.grad);
}
}  // namespace

#define FASTOPT_CUDA_STEP_INSTANTIATE(R) \
  template void step<R>(const CudaPlan&, const CudaLr&, const R::Hyper&, const GradArgs&);
FASTOPT_RULES(FASTOPT_CUDA_STEP_INSTANTIATE)

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
#define FASTOPT_CUDA_UPDATE_IMPL(R) \
  m.impl(op_name<R>().c_str(), torch::CppFunction::makeFromBoxedFunction<&update_op<R>>());
  FASTOPT_RULES(FASTOPT_CUDA_UPDATE_IMPL)
}

}  // namespace cuda
}  // namespace fastopt
