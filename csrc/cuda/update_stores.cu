// The CUDA launches of the stores other than torch's: bf16 state stored stochastically (Note
// [stochastic state]) and float16/bfloat16 params stored with compensation (Note [param store]),
// every rule (update.cuh has the kernel).
#include "update.cuh"

namespace fastopt {
namespace cuda {

namespace {
// fn(S{}, master, stochastic, store) for the plan's storage: dispatch_storage's (S, master), then,
// for float32 compute, whether the state is bfloat16 stored stochastically, and for float16/
// bfloat16 params without masters how they are stored (csrc/cpu/kernels/update.cpp dispatches the
// same).
template <typename Fn>
void dispatch_stores(const char* op, const CudaPlan& plan, Fn&& fn) {
  const Rounding& r = plan.rounding();
  dispatch_storage(op, plan.dtype(kGradSlot), plan.dtype(kParamSlot), plan.master(), [&](auto s, auto kMaster) {
    using S = decltype(s);
    constexpr bool kM = decltype(kMaster)::value;  // a constant: see launch_stores
    if constexpr (std::is_same_v<S, double>) {
      fn(s, kMaster, std::false_type{}, NearestStore{});
    } else {
      with_bool(r.stochastic_state, [&](auto kStochastic) {
        if constexpr (!is_low_precision<S>() || kM) {
          fn(s, kMaster, kStochastic, NearestStore{});
        } else {
          with_param_store<S>(r.param, [&](auto kStore) { fn(s, kMaster, kStochastic, kStore); });
        }
      });
    }
  });
}
}  // namespace

template <typename R>
void launch_stores(const CudaPlan& plan, const typename R::Hyper& h, const UpdateParams<R>& prm) {
  dispatch_stores(op_name<R>().c_str(), plan, [&](auto s, auto kMaster, auto kStochastic, auto kStore) {
    // constants: in a lambda that captures x, nvcc's host pass takes decltype(x) for a reference
    constexpr bool kM = decltype(kMaster)::value, kRandomState = decltype(kStochastic)::value;
    constexpr ParamStore kHow = decltype(kStore)::value;
    if constexpr (kRandomState || kHow != ParamStore::kNearest) {
      launch_rule<R, decltype(s), kM, kRandomState, kHow>(plan, h, prm);
    } else {  // check_rounding refused what would land here; torch's stores launch in update.cu
      TORCH_INTERNAL_ASSERT(false, "fastopt (cuda): launch_stores for a plan that stores as torch does");
    }
  });
}

#define FASTOPT_CUDA_STORES_INSTANTIATE(R) \
  template void launch_stores<R>(const CudaPlan&, const R::Hyper&, const UpdateParams<R>&);
FASTOPT_RULES(FASTOPT_CUDA_STORES_INSTANTIATE)

}  // namespace cuda
}  // namespace fastopt
