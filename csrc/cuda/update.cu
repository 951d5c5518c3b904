// The update kernel of every rule on CUDA (Note [a rule in C++], fastopt/update_math.h): one
// launch for every tensor of a group (engine.cuh), per-step scalars computed on the device from
// each tensor's step count (R::scalars, in double), the element math R::update (update.cuh). The
// steps that store as torch does are launched here, the others in update_stores.cu.
#include <torch/library.h>

#include "update.cuh"

namespace fastopt {
namespace cuda {

template <typename R>
void step(const CudaPlan& plan, const CudaLr& lr, const typename R::Hyper& h, const GradArgs& g) {
  if (plan.size() == 0) return;
  check_states<R>(h, [&](size_t s) { return plan.present(s); });
  const Rounding& r = plan.rounding();
  check_rounding(op_name<R>().c_str(), r, plan.dtype(kGradSlot), plan.dtype(kParamSlot),
                 plan.present(params_out_slot<R>()));
  const UpdateParams<R> prm{h, device_lr(lr, plan.device()), device_grad_args(g, h.maximize, plan.device())};
  if (r.stochastic_state || r.param != ParamStore::kNearest) return launch_stores<R>(plan, h, prm);
  dispatch_storage(op_name<R>().c_str(), plan.dtype(kGradSlot), plan.dtype(kParamSlot), plan.master(),
                   [&](auto s, auto kMaster) {
                     launch_rule<R, decltype(s), decltype(kMaster)::value, false, ParamStore::kNearest>(plan, h, prm);
                   });
}

namespace {
// torch.ops.fastopt.<rule>_ on CUDA tensors: a one-off plan (what torch.compile calls).
template <typename R>
void update_op(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  const UpdateOpArgs<R> a = pop_update_args<R>(*stack);
  if (a.slots[kParamSlot].second.empty()) return;
  const CudaPlan plan(a.slots, a.steps, {}, a.rounding);
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
