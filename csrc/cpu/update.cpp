// The update op of every rule on the CPU (Note [a rule in C++], fastopt/update_math.h): the checks
// and the step counts here, the chunk loop in the capability kernels (kernels/update.cpp); the
// torch.ops.fastopt.<rule>_ list ops, and the planned steps of eager training (ops.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "capability.h"
#include "fastopt/dispatch.h"
#include "fastopt/update_op.h"
#include "ops.h"

namespace fastopt {
namespace cpu {

template <typename R>
std::shared_ptr<Slots> make_slots(const SlotLists& lists, at::TensorList steps, Rounding rounding) {
  TORCH_CHECK(lists.size() == params_out_slot<R>() + 1, "fastopt (cpu): ", op_name<R>(), " takes ",
              params_out_slot<R>() + 1, " tensor lists (params, grads, its state, params_out), got ", lists.size());
  std::vector<std::pair<const char*, at::TensorList>> views;
  for (const auto& [name, list] : lists) views.emplace_back(name, list);
  return std::make_shared<Slots>(views, written_slots<R>(), steps, std::move(rounding));
}

template <typename R>
void apply(const Slots& sl, const Lr& lr, const typename R::Hyper& h, const GradArgs& ga) {
  if (sl.size() == 0 || ga.skip()) return;
  check_states<R>(h, [&](size_t s) { return sl.present(s); });
  check_storage(op_name<R>().c_str(), sl.dtype(kGradSlot), sl.dtype(kParamSlot), sl.master());
  check_rounding(op_name<R>().c_str(), sl.rounding(), sl.dtype(kGradSlot), sl.dtype(kParamSlot),
                 sl.present(params_out_slot<R>()));
  const std::vector<double> t = sl.increment_steps();
  kernels().update(sl.update_args(t, lr, ga.prep(h.maximize)), h);
}

namespace {
// torch.ops.fastopt.<rule>_ on CPU tensors: a one-off plan of the lists as given (any layout:
// Note [dense tensors, any layout]), results copied back where a tensor had to be made contiguous.
template <typename R>
void update_op(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  const UpdateOpArgs<R> a = pop_update_args<R>(*stack);
  if (a.slots[kParamSlot].second.empty()) return;
  if (a.grad.skip()) return;
  auto sl = make_slots<R>(a.slots, a.steps, a.rounding);
  apply<R>(*sl, Lr(a.lr), a.hyper, a.grad);
  sl->finish();
}
}  // namespace

#define FASTOPT_CPU_UPDATE_INSTANTIATE(R)                                                            \
  template std::shared_ptr<Slots> make_slots<R>(const SlotLists&, at::TensorList, Rounding);             \
  template void apply<R>(const Slots&, const Lr&, const R::Hyper&, const GradArgs&);
FASTOPT_RULES(FASTOPT_CPU_UPDATE_INSTANTIATE)

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
#define FASTOPT_CPU_UPDATE_IMPL(R) \
  m.impl(op_name<R>().c_str(), torch::CppFunction::makeFromBoxedFunction<&update_op<R>>());
  FASTOPT_RULES(FASTOPT_CPU_UPDATE_IMPL)
}

}  // namespace cpu
}  // namespace fastopt
