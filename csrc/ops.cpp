// Operator schemas of fastopt (torch.ops.fastopt.*), their Meta implementations (so torch.compile
// can trace a step) and the Python module fastopt._C.
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>

#include <torch/csrc/autograd/custom_function.h>

#include "cpu/capability.h"
#include "cpu/ops.h"
#include "fastopt/bn_relu_host.h"
#ifdef FASTOPT_WITH_CUDA
#include "cuda/plan.h"
#endif

namespace fastopt {
namespace {

at::Tensor multi_tensor_norm_meta(at::TensorList tensors, double /*norm_type*/,
                                  const c10::optional<at::Tensor>& /*inv_scale*/,
                                  c10::optional<double> /*clip_value*/) {
  const bool fp64 = !tensors.empty() && tensors[0].scalar_type() == at::kDouble;
  const auto device = tensors.empty() ? at::Device(at::kMeta) : tensors[0].device();
  return at::empty({}, at::TensorOptions().dtype(fp64 ? at::kDouble : at::kFloat).device(device));
}

// The update ops mutate their lists in place and return nothing: on Meta there is nothing to do.
void adam_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
               at::TensorList, at::TensorList, const at::Tensor&, double, double, double, double, bool,
               bool, bool, const c10::optional<at::Tensor>&, c10::optional<double>,
               const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&) {}
void adagrad_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                  const at::Tensor&, double, double, double, bool, const c10::optional<at::Tensor>&,
                  c10::optional<double>, const c10::optional<at::Tensor>&,
                  const c10::optional<at::Tensor>&) {}
void rmsprop_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                  at::TensorList, at::TensorList, const at::Tensor&, double, double, double, double,
                  bool, bool, const c10::optional<at::Tensor>&, c10::optional<double>,
                  const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&) {}

// BatchNorm+ReLU: outputs laid out like the input; per-channel tensors in the statistics dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_forward_meta(
    const at::Tensor& x, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool, double, double) {
  const auto stats = x.options().dtype(bn::stat_type(x));
  return {at::empty_like(x), at::empty({x.size(1)}, stats), at::empty({x.size(1)}, stats)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_meta(
    const at::Tensor&, const at::Tensor& x, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, bool, bool need_input_grad) {
  const auto stats = x.options().dtype(bn::stat_type(x));
  return {need_input_grad ? at::empty_like(x) : at::empty({0}, x.options()), at::empty({x.size(1)}, stats),
          at::empty({x.size(1)}, stats)};
}

}  // namespace

// Shared tail of every update op: what is done to the gradients first (see fastopt/grad_math.h)
// and GradScaler's skip flag.
#define FASTOPT_GRAD_ARGS \
  "Tensor? inv_scale, float? clip_value, Tensor? clip_coef, Tensor? found_inf"

TORCH_LIBRARY(fastopt, m) {
  // The norm (2.0 or inf) of every element of `tensors` after `g * inv_scale` and the clamp to
  // [-clip_value, clip_value]; float32 (float64 for float64 input), NaN/inf propagate.
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type, Tensor? inv_scale, float? clip_value)"
        " -> Tensor");
  // One step for every tensor of a (device, dtype) group, in place. `params` are the tensors the
  // math runs on (the fp32 masters with master weights, whose rounded values go to `params_out`;
  // otherwise `params_out` is empty). `steps` are incremented (not when found_inf is set).
  m.def("adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
        " Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor(f!)[] params_out, Tensor lr,"
        " float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize,"
        " bool decoupled_weight_decay, " FASTOPT_GRAD_ARGS ") -> ()");
  m.def("adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor(c!)[] steps,"
        " Tensor(d!)[] params_out, Tensor lr, float lr_decay, float weight_decay, float eps,"
        " bool maximize, " FASTOPT_GRAD_ARGS ") -> ()");
  m.def("rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs,"
        " Tensor(c!)[] grad_avgs, Tensor(d!)[] momentum_buffers, Tensor(e!)[] steps,"
        " Tensor(f!)[] params_out, Tensor lr, float alpha, float eps, float weight_decay,"
        " float momentum, bool centered, bool maximize, " FASTOPT_GRAD_ARGS ") -> ()");
  // relu(batch_norm(input)) (fastopt/reference/batch_norm_relu.py): returns (y, mean, invstd) and,
  // when training, moves the running statistics given. Input contiguous or channels_last.
  m.def("bn_relu_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
        " Tensor(b!)? running_var, bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  // (grad_input, grad_weight, grad_bias); grad_input is empty unless need_input_grad. `training`:
  // the forward used the batch statistics.
  m.def("bn_relu_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor mean,"
        " Tensor invstd, bool training, bool need_input_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastopt, Meta, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_meta);
  m.impl("adam_", &adam_meta);
  m.impl("adagrad_", &adagrad_meta);
  m.impl("rmsprop_", &rmsprop_meta);
  m.impl("bn_relu_forward", &bn_relu_forward_meta);
  m.impl("bn_relu_backward", &bn_relu_backward_meta);
}

}  // namespace fastopt

namespace {
namespace py = pybind11;
using fastopt::cpu::GradArgs;
using fastopt::cpu::Lr;
using fastopt::cpu::Slots;
using Tensors = std::vector<at::Tensor>;
using OptTensor = c10::optional<at::Tensor>;

std::shared_ptr<Slots> with_owners(std::shared_ptr<Slots> plan, Tensors owners) {
  plan->set_owners(std::move(owners));
  return plan;
}

// A plan's bind_grads() to Python: None when the plan is stale (rebuild it), else the counts
// (bound as they are, relaid, without a grad) of fastopt::BindResult.
py::object bind_result(const fastopt::BindResult& r) {
  if (r.stale) return py::none();
  return py::make_tuple(r.bound, r.relaid, r.no_grad);
}

// bind_grads(owners=None, grads=None): with both given (the local shards of DTensor params and of
// their grads, None for an absent grad), those are bound instead of the plan's owners' .grad.
template <typename Plan>
py::object bind_plan(Plan& plan, c10::optional<Tensors> owners, c10::optional<std::vector<OptTensor>> grads) {
  TORCH_CHECK(owners.has_value() == grads.has_value(), "bind_grads: give both owners and grads, or neither");
  if (!owners.has_value()) return bind_result(plan.bind_grads());
  fastopt::GivenGrads given{std::move(*owners), {}};
  for (auto& g : *grads) given.grads.push_back(g.has_value() ? std::move(*g) : at::Tensor());
  return bind_result(plan.bind_grads(&given));
}

// Note [the Triton plan binds in C++]: the Triton plan's grads are bound by the same C++ code as
// the CPU and CUDA plans' (a Python loop over the params cost ~1.3 us each, 5 ms a step at 4,000
// tensors). bind() returns None when the plan is stale, else (bound, relaid, absent, table):
// `table` the grad address of every param (int64; -1 without a grad, Note [absent grads]) in a
// fresh CPU tensor, pinned if asked, for an asynchronous upload, when an address changed since the
// last bind; else None. Without the extension the Triton plan binds in Python (same protocol).
class TableBinder {
 public:
  TableBinder(Tensors owners, Tensors templates)
      : bound_(templates.size()), addresses_(templates.size()), uploaded_(templates.size()) {
    for (size_t i = 0; i < templates.size(); ++i) uploaded_[i] = reinterpret_cast<int64_t>(templates[i].data_ptr());
    binder_ = fastopt::GradBinder(std::move(owners), std::move(templates));
  }

  py::object bind(c10::optional<Tensors> owners, c10::optional<std::vector<OptTensor>> grads, bool pinned) {
    TORCH_CHECK(owners.has_value() == grads.has_value(), "bind_grads: give both owners and grads, or neither");
    fastopt::BindResult r;
    if (owners.has_value()) {
      fastopt::GivenGrads given{std::move(*owners), {}};
      for (auto& g : *grads) given.grads.push_back(g.has_value() ? std::move(*g) : at::Tensor());
      r = binder_.bind(bound_, addresses_.data(), "triton", &given);
    } else {
      r = binder_.bind(bound_, addresses_.data(), "triton");
    }
    if (r.stale) return py::none();
    bool changed = false;
    for (size_t i = 0; i < addresses_.size(); ++i) {
      const int64_t a = reinterpret_cast<int64_t>(addresses_[i]);
      changed = changed || a != uploaded_[i];
      uploaded_[i] = a;
    }
    py::object table = py::none();
    if (changed) {
      at::Tensor t = at::empty({static_cast<int64_t>(uploaded_.size())},
                               at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
      std::copy(uploaded_.begin(), uploaded_.end(), t.data_ptr<int64_t>());
      table = py::cast(t);
    }
    return py::make_tuple(r.bound, r.relaid, r.no_grad, table);
  }

  void release_grads() { fastopt::release_grads(bound_); }

 private:
  fastopt::GradBinder binder_;
  Tensors bound_;
  std::vector<void*> addresses_;  // this step's, from the binding
  std::vector<int64_t> uploaded_;  // as the plan's table holds them
};

// Runs `apply` on a plan whose grads were bound this step (bind_grads), without
// the GIL: the kernels use OpenMP threads and take no Python objects.
template <typename Apply>
void planned_step(const GradArgs& ga, Apply&& apply) {
  if (ga.skip()) return;
  py::gil_scoped_release no_gil;
  apply();
}

// Note [BatchNorm+ReLU autograd in C++]: for the compiled backends the autograd node is a C++
// torch::autograd::Function: no Python context object and no Python backward call, which for a
// small feature map (ResNet's 7x7 layers) cost as much as the kernels themselves. Under
// torch.compile fastopt/nn/functional.py uses its Python autograd.Function instead (Dynamo traces
// that one, calling the ops through their meta kernels).
// The backward as a node of its own whose backward refuses: differentiating the gradients again
// (create_graph=True) raises rather than treating BatchNorm+ReLU as constant, as
// torch.autograd.function.once_differentiable does for the Python Function.
class BnReluGradFunction : public torch::autograd::Function<BnReluGradFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext*, const at::Tensor& dy,
                                                const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                const at::Tensor& mean, const at::Tensor& invstd, bool training,
                                                bool need_dx) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastopt::bn_relu_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                   const at::Tensor&, const at::Tensor&, bool, bool)>();
    auto [dx, dweight, dbias] = op.call(dy, x, weight, bias, mean, invstd, training, need_dx);
    return {dx, dweight, dbias};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*, torch::autograd::variable_list) {
    TORCH_CHECK(false, "fastopt BatchNormReLU has no double backward (its backward is once differentiable)");
    return {};
  }
};

class BnReluFunction : public torch::autograd::Function<BnReluFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                            const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                            bool training, double momentum, double eps) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastopt::bn_relu_forward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                   const OptTensor&, bool, double, double)>();
    auto [y, mean, invstd] = op.call(x, weight, bias, running_mean, running_var, training, momentum, eps);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, invstd});
    ctx->saved_data["training"] = training;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const bool need_dx = ctx->needs_input_grad(0);
    const at::Tensor dy = grads[0].contiguous(x.is_contiguous() ? at::MemoryFormat::Contiguous : x.suggest_memory_format());
    auto g = BnReluGradFunction::apply(dy, x, weight.defined() ? OptTensor(weight) : OptTensor(),
                                       bias.defined() ? OptTensor(bias) : OptTensor(), saved[3], saved[4],
                                       ctx->saved_data["training"].toBool(), need_dx);
    // needs_input_grad counts only the tensor inputs given (an absent weight has no edge)
    const size_t weight_edge = 1, bias_edge = weight.defined() ? 2 : 1;
    return {need_dx ? g[0] : at::Tensor(),
            weight.defined() && ctx->needs_input_grad(weight_edge) ? g[1] : at::Tensor(),
            bias.defined() && ctx->needs_input_grad(bias_edge) ? g[2] : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

#ifdef FASTOPT_WITH_CUDA
// The CUDA plans (csrc/cuda/plan.h): built once per param group, grads bound in C++ each step.
void bind_cuda(py::module& m) {
  namespace fc = fastopt::cuda;
  using fc::CudaPlan;
  py::class_<CudaPlan, std::shared_ptr<CudaPlan>>(m, "CudaPlan")
      .def("bind_grads", &bind_plan<CudaPlan>, py::arg("owners") = py::none(), py::arg("grads") = py::none())
      .def("release_grads", &CudaPlan::release_grads)
      .def("grad_norm", [](const CudaPlan& plan, double norm_type, OptTensor grad_scale, c10::optional<double> clip,
                           c10::optional<double> max_norm) {
        return fc::grad_norm(plan, norm_type, grad_scale, clip, max_norm);
      });
  m.def("cuda_adam_plan", &fc::adam_plan);
  m.def("cuda_adagrad_plan", &fc::adagrad_plan);
  m.def("cuda_rmsprop_plan", &fc::rmsprop_plan);
  // lr: a tensor on the params' device (read by the kernel), else `lr_value` (lr_fp32: it came
  // from a float32 tensor and follows torch's float32 arithmetic).
  m.def("cuda_adam_step", [](const CudaPlan& plan, OptTensor lr, double lr_value, bool lr_fp32, double beta1,
                             double beta2, double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                             OptTensor grad_scale, c10::optional<double> clip, OptTensor coef, OptTensor found_inf) {
    fc::adam_step(plan, {lr, lr_value, lr_fp32}, {beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled},
                  {grad_scale, clip, coef, found_inf});
  });
  m.def("cuda_adagrad_step", [](const CudaPlan& plan, OptTensor lr, double lr_value, bool lr_fp32, double lr_decay,
                                double weight_decay, double eps, bool maximize, OptTensor grad_scale,
                                c10::optional<double> clip, OptTensor coef, OptTensor found_inf) {
    fc::adagrad_step(plan, {lr, lr_value, lr_fp32}, {lr_decay, weight_decay, eps, maximize},
                     {grad_scale, clip, coef, found_inf});
  });
  m.def("cuda_rmsprop_step", [](const CudaPlan& plan, OptTensor lr, double lr_value, bool lr_fp32, double alpha,
                                double eps, double weight_decay, double momentum, bool centered, bool maximize,
                                OptTensor grad_scale, c10::optional<double> clip, OptTensor coef, OptTensor found_inf) {
    fc::rmsprop_step(plan, {lr, lr_value, lr_fp32}, {alpha, eps, weight_decay, momentum, centered, maximize},
                     {grad_scale, clip, coef, found_inf});
  });
}
#endif
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastopt compiled ops; they register themselves as torch.ops.fastopt.*";
#ifdef FASTOPT_WITH_CUDA
  m.def("built_with_cuda", [] { return true; });
  bind_cuda(m);
#else
  m.def("built_with_cuda", [] { return false; });
#endif
  // The CPU kernels' build in use, and the ones this CPU can run (csrc/cpu/capability.h); the
  // first call makes the choice (fastopt's import does), and raises for a FASTOPT_CPU_CAPABILITY
  // this CPU or build cannot honour.
  m.def("cpu_capability", [] { return fastopt::cpu::capability_name(fastopt::cpu::capability()); });
  m.def("cpu_capabilities", [] {
    std::vector<std::string> out;
    for (auto c : {fastopt::cpu::Capability::kDefault, fastopt::cpu::Capability::kAvx2,
                   fastopt::cpu::Capability::kAvx512}) {
      if (fastopt::cpu::capability_supported(c)) out.emplace_back(fastopt::cpu::capability_name(c));
    }
    return out;
  });
  // relu(batch_norm(x)) with its autograd node in C++ (Note [BatchNorm+ReLU autograd in C++]).
  m.def("bn_relu", [](const at::Tensor& x, OptTensor weight, OptTensor bias, OptTensor running_mean,
                      OptTensor running_var, bool training, double momentum, double eps) {
    py::gil_scoped_release no_gil;
    return BnReluFunction::apply(x, weight, bias, running_mean, running_var, training, momentum, eps);
  });
  py::class_<TableBinder, std::shared_ptr<TableBinder>>(m, "GradBinder")
      .def(py::init<Tensors, Tensors>(), py::arg("owners"), py::arg("templates"))
      .def("bind", &TableBinder::bind, py::arg("owners") = py::none(), py::arg("grads") = py::none(),
           py::arg("pinned") = false)
      .def("release_grads", &TableBinder::release_grads);
  // Note [the plan cache], CPU side: a plan holds one param group's tensors, data pointers and
  // chunk table; an eager step binds the gradients (Note [binding grads in C++]) and runs the
  // same kernels as the ops above.
  using fastopt::cpu::kGradSlot;
  py::class_<Slots, std::shared_ptr<Slots>>(m, "CpuPlan")
      .def("bind_grads", &bind_plan<Slots>, py::arg("owners") = py::none(), py::arg("grads") = py::none())
      .def("release_grads", &Slots::release_grads)
      .def("grad_norm", [](const Slots& sl, double norm_type, OptTensor inv_scale, c10::optional<double> clip) {
        py::gil_scoped_release no_gil;
        return fastopt::cpu::grad_norm(sl, kGradSlot, norm_type, inv_scale, clip);
      });
  // Plan builders, in each op's slot order (the grads slot takes this step's grads).
  m.def("cpu_adam_plan", [](const Tensors& params, const Tensors& grads, const Tensors& exp_avgs,
                            const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs, const Tensors& steps,
                            const Tensors& params_out, Tensors owners) {
    return with_owners(
        fastopt::cpu::adam_slots(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, params_out), owners);
  });
  m.def("cpu_adagrad_plan", [](const Tensors& params, const Tensors& grads, const Tensors& sums,
                               const Tensors& steps, const Tensors& params_out, Tensors owners) {
    return with_owners(fastopt::cpu::adagrad_slots(params, grads, sums, steps, params_out), owners);
  });
  m.def("cpu_rmsprop_plan", [](const Tensors& params, const Tensors& grads, const Tensors& square_avgs,
                               const Tensors& grad_avgs, const Tensors& momentum_buffers, const Tensors& steps,
                               const Tensors& params_out, Tensors owners) {
    return with_owners(
        fastopt::cpu::rmsprop_slots(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, params_out),
        owners);
  });
  m.def("cpu_adam_step", [](const Slots& plan, const at::Tensor& lr, double beta1, double beta2, double eps,
                            double weight_decay, bool amsgrad, bool maximize, bool decoupled, OptTensor inv_scale,
                            c10::optional<double> clip, OptTensor coef, OptTensor found_inf) {
    const GradArgs ga{inv_scale, clip, coef, found_inf};
    planned_step(ga, [&] {
      fastopt::cpu::adam_apply(plan, Lr(lr), {beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled}, ga);
    });
  });
  m.def("cpu_adagrad_step", [](const Slots& plan, const at::Tensor& lr, double lr_decay, double weight_decay,
                               double eps, bool maximize, OptTensor inv_scale, c10::optional<double> clip,
                               OptTensor coef, OptTensor found_inf) {
    const GradArgs ga{inv_scale, clip, coef, found_inf};
    planned_step(ga, [&] {
      fastopt::cpu::adagrad_apply(plan, Lr(lr), {lr_decay, weight_decay, eps, maximize}, ga);
    });
  });
  m.def("cpu_rmsprop_step", [](const Slots& plan, const at::Tensor& lr, double alpha, double eps,
                               double weight_decay, double momentum, bool centered, bool maximize,
                               OptTensor inv_scale, c10::optional<double> clip, OptTensor coef,
                               OptTensor found_inf) {
    const GradArgs ga{inv_scale, clip, coef, found_inf};
    planned_step(ga, [&] {
      fastopt::cpu::rmsprop_apply(plan, Lr(lr), {alpha, eps, weight_decay, momentum, centered, maximize}, ga);
    });
  });
}
