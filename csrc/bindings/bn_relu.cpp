// fastopt._C.bn_relu: relu(batch_norm(x)) with its autograd node in C++.
#include <torch/csrc/autograd/custom_function.h>

#include "bindings.h"

namespace fastopt {
namespace bindings {
namespace {

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

}  // namespace

void bind_bn_relu(py::module& m) {
  // relu(batch_norm(x)) with its autograd node in C++ (Note [BatchNorm+ReLU autograd in C++]).
  m.def("bn_relu", [](const at::Tensor& x, OptTensor weight, OptTensor bias, OptTensor running_mean,
                      OptTensor running_var, bool training, double momentum, double eps) {
    py::gil_scoped_release no_gil;
    return BnReluFunction::apply(x, weight, bias, running_mean, running_var, training, momentum, eps);
  });
}

}  // namespace bindings
}  // namespace fastopt
