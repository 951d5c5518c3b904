// Operator schemas of fastopt (torch.ops.fastopt.*) and their Meta implementations (so that
// torch.compile can trace a step). The CPU and CUDA implementations register themselves from
// csrc/cpu/ and csrc/cuda/; the Python module fastopt._C is csrc/bindings/.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fastopt/bn_relu_host.h"
#include "fastopt/update_op.h"

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
void update_meta(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  torch::jit::drop(*stack, op.schema().arguments().size());
}

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

TORCH_LIBRARY(fastopt, m) {
  // The norm (2.0 or inf) of every element of `tensors` after `g * inv_scale` and the clamp to
  // [-clip_value, clip_value]; float32 (float64 for float64 input), NaN/inf propagate.
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type, Tensor? inv_scale, float? clip_value)"
        " -> Tensor");
  // Every rule's update op: Note [one schema per rule] (fastopt/update_op.h).
#define FASTOPT_DEF_UPDATE(R) m.def(op_schema<R>().c_str());
  FASTOPT_RULES(FASTOPT_DEF_UPDATE)
#undef FASTOPT_DEF_UPDATE
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
#define FASTOPT_IMPL_UPDATE(R) m.impl(op_name<R>().c_str(), torch::CppFunction::makeFromBoxedFunction<&update_meta>());
  FASTOPT_RULES(FASTOPT_IMPL_UPDATE)
#undef FASTOPT_IMPL_UPDATE
  m.impl("bn_relu_forward", &bn_relu_forward_meta);
  m.impl("bn_relu_backward", &bn_relu_backward_meta);
}

}  // namespace fastopt

