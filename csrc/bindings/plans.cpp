// fastopt._C's plans of the update rules, CPU and CUDA (Note [the plan cache]): built once per
// param group, grads bound in C++ each step, stepped without the GIL. Written once for every rule
// (Note [a rule in C++]): a plan records its rule when it is built, and a step reads that rule's
// hyperparameters from a sequence in the order of its declaration (fastopt/rules.py, Rule.hyper).
#include "bindings.h"

#include <string>

#include "../cpu/ops.h"
#include "fastopt/update_op.h"
#ifdef FASTOPT_WITH_CUDA
#include "../cuda/plan.h"
#endif

namespace fastopt {
namespace bindings {
namespace {

// fn(R{}) for the rule at index `id` of FASTOPT_RULES.
template <typename Fn>
void with_rule(int id, Fn&& fn) {
  int i = 0;
#define FASTOPT_VISIT(R) \
  if (id == i++) return fn(R{});
  FASTOPT_RULES(FASTOPT_VISIT)
#undef FASTOPT_VISIT
  TORCH_CHECK(false, "fastopt: no rule ", id);
}

int rule_id(const std::string& name) {
  int i = 0;
#define FASTOPT_FIND(R)              \
  if (name == R::kName) return i; \
  ++i;
  FASTOPT_RULES(FASTOPT_FIND)
#undef FASTOPT_FIND
  TORCH_CHECK(false, "fastopt: no update rule named '", name, "'");
}

// A rule's hyperparameters from Python, in its declaration's order.
template <typename R>
typename R::Hyper hyper_from(const py::sequence& values) {
  TORCH_CHECK(py::len(values) == hyper_count<R>(), "fastopt: ", R::kName, " takes ", hyper_count<R>(),
              " hyperparameters after lr, got ", py::len(values));
  typename R::Hyper h{};
  size_t i = 0;
  for_each_hyper<R>([&](const auto& f) {
    h.*(f.member) = values[i++].template cast<typename std::decay_t<decltype(f)>::value_type>();
  });
  return h;
}

// The plan's lists: params, grads, the rule's state lists, params_out (Python lists, in that order).
template <typename R>
SlotLists slot_lists(const std::vector<Tensors>& lists) {
  SlotLists out = empty_slots<R>();
  TORCH_CHECK(lists.size() == out.size(), "fastopt: a ", R::kName, " plan takes ", out.size(),
              " tensor lists (params, grads, its state, params_out), got ", lists.size());
  for (size_t s = 0; s < out.size(); ++s) out[s].second = lists[s];
  return out;
}

// A plan and the rule it was built for.
template <typename Plan>
struct RulePlan {
  std::shared_ptr<Plan> plan;
  int rule;
};

// A plan of `rule` over `lists` (Python lists in the rule's slot order; the grads slot holds
// placeholders: the layout and dtype of the grads the plan takes, bind_grads() fills it):
// build(R{}, slots) makes the Plan for the rule R.
template <typename Plan, typename Build>
RulePlan<Plan> plan_of(const std::string& rule, const std::vector<Tensors>& lists, Build&& build) {
  RulePlan<Plan> out{nullptr, rule_id(rule)};
  with_rule(out.rule, [&](auto r) { out.plan = build(r, slot_lists<decltype(r)>(lists)); });
  return out;
}

// The methods every plan has: bind_grads(owners=None, grads=None), release_grads().
template <typename Plan>
py::object bind_plan(RulePlan<Plan>& p, c10::optional<Tensors> owners, c10::optional<std::vector<OptTensor>> grads) {
  const c10::optional<GivenGrads> given = given_grads(std::move(owners), std::move(grads));
  return bind_result(p.plan->bind_grads(given.has_value() ? &*given : nullptr));
}

template <typename Plan>
py::class_<RulePlan<Plan>> plan_class(py::module& m, const char* name) {
  return py::class_<RulePlan<Plan>>(m, name)
      .def("bind_grads", &bind_plan<Plan>, py::arg("owners") = py::none(), py::arg("grads") = py::none())
      .def("release_grads", [](RulePlan<Plan>& p) { p.plan->release_grads(); });
}

// {rule name: (state list names, hyperparameter names)}: what this build declares
// (tests/test_rules.py compares it with fastopt/rules.py).
py::dict declared_rules() {
  py::dict out;
#define FASTOPT_DESCRIBE(R)                                                   \
  {                                                                           \
    py::list states, hyper;                                                   \
    for (const char* s : R::kStateNames) states.append(s);                    \
    for_each_hyper<R>([&](const auto& f) { hyper.append(f.name); });          \
    out[R::kName] = py::make_tuple(py::tuple(states), py::tuple(hyper));      \
  }
  FASTOPT_RULES(FASTOPT_DESCRIBE)
#undef FASTOPT_DESCRIBE
  return out;
}

using CpuPlan = RulePlan<cpu::Slots>;

void bind_cpu(py::module& m) {
  plan_class<cpu::Slots>(m, "CpuPlan")
      .def("grad_norm", [](const CpuPlan& p, double norm_type, OptTensor inv_scale, c10::optional<double> clip) {
        py::gil_scoped_release no_gil;
        return cpu::grad_norm(*p.plan, kGradSlot, norm_type, inv_scale, clip);
      })
      // the chunks of the last update (Note [adjacent tensors, one range], csrc/cpu/multi_tensor.h)
      .def_property_readonly("update_chunks", [](const CpuPlan& p) { return p.plan->update_chunks(); });
  // cpu_plan(rule, lists, steps, owners, seeds=[], stochastic_state=False, compensation=None)
  // (plan_of; how it stores: Rounding, fastopt/update_op.h)
  m.def(
      "cpu_plan",
      [](const std::string& rule, const std::vector<Tensors>& lists, const Tensors& steps, Tensors owners,
         const std::vector<int64_t>& seeds, bool stochastic_state, const c10::optional<std::string>& compensation) {
        const Rounding rounding{seeds, stochastic_state, param_store(compensation)};
        CpuPlan out = plan_of<cpu::Slots>(rule, lists, [&](auto r, const SlotLists& slots) {
          return cpu::make_slots<decltype(r)>(slots, steps, rounding);
        });
        out.plan->set_owners(std::move(owners));
        return out;
      },
      py::arg("rule"), py::arg("lists"), py::arg("steps"), py::arg("owners"), py::arg("seeds") = std::vector<int64_t>{},
      py::arg("stochastic_state") = false, py::arg("compensation") = py::none());
  // cpu_step(plan, lr, hyper, inv_scale, clip_value, clip_coef, found_inf): lr a CPU tensor.
  m.def("cpu_step", [](const CpuPlan& p, const at::Tensor& lr, const py::sequence& hyper, OptTensor inv_scale,
                       c10::optional<double> clip, OptTensor coef, OptTensor found_inf) {
    const GradArgs ga{inv_scale, clip, coef, found_inf, /*scale_is_inverse=*/true};
    if (ga.skip()) return;
    with_rule(p.rule, [&](auto r) {
      using R = decltype(r);
      const typename R::Hyper h = hyper_from<R>(hyper);
      const cpu::Lr value(lr);
      py::gil_scoped_release no_gil;  // the kernels use OpenMP threads and take no Python objects
      cpu::apply<R>(*p.plan, value, h, ga);
    });
  });
}

#ifdef FASTOPT_WITH_CUDA
using CudaPlan = RulePlan<cuda::CudaPlan>;

void bind_cuda(py::module& m) {
  plan_class<cuda::CudaPlan>(m, "CudaPlan")
      .def("grad_norm", [](const CudaPlan& p, double norm_type, OptTensor grad_scale, c10::optional<double> clip,
                           c10::optional<double> max_norm) {
        return cuda::grad_norm(*p.plan, norm_type, grad_scale, clip, max_norm);
      })
      // how many chunks the update launches walk (Note [ranges on the GPU]): the tests see a merge
      .def_property_readonly("update_chunks", [](const CudaPlan& p) { return p.plan->update_chunks(); });
  // cuda_plan(rule, lists, steps, owners, seeds=[], stochastic_state=False, compensation=None)
  // (plan_of; how it stores: Rounding, fastopt/update_op.h), as cpu_plan
  m.def(
      "cuda_plan",
      [](const std::string& rule, const std::vector<Tensors>& lists, const Tensors& steps, Tensors owners,
         const std::vector<int64_t>& seeds, bool stochastic_state, const c10::optional<std::string>& compensation) {
        const Rounding rounding{seeds, stochastic_state, param_store(compensation)};
        return plan_of<cuda::CudaPlan>(rule, lists, [&](auto, const SlotLists& slots) {
          return std::make_shared<cuda::CudaPlan>(slots, steps, std::move(owners), rounding);
        });
      },
      py::arg("rule"), py::arg("lists"), py::arg("steps"), py::arg("owners"), py::arg("seeds") = std::vector<int64_t>{},
      py::arg("stochastic_state") = false, py::arg("compensation") = py::none());
  // cuda_step(plan, lr, lr_value, lr_fp32, hyper, grad_scale, clip_value, clip_coef, found_inf): lr a
  // tensor on the params' device (read by the kernel), else `lr_value` (lr_fp32: it came from a
  // float32 tensor and follows torch's float32 arithmetic).
  m.def("cuda_step", [](const CudaPlan& p, OptTensor lr, double lr_value, bool lr_fp32, const py::sequence& hyper,
                        OptTensor grad_scale, c10::optional<double> clip, OptTensor coef, OptTensor found_inf) {
    with_rule(p.rule, [&](auto r) {
      using R = decltype(r);
      cuda::step<R>(*p.plan, {lr, lr_value, lr_fp32}, hyper_from<R>(hyper),
                    GradArgs{grad_scale, clip, coef, found_inf, /*scale_is_inverse=*/false});
    });
  });
}
#endif

}  // namespace

void bind_plans(py::module& m) {
  m.def("declared_rules", &declared_rules);
  bind_cpu(m);
#ifdef FASTOPT_WITH_CUDA
  bind_cuda(m);
#endif
}

}  // namespace bindings
}  // namespace fastopt
