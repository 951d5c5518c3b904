// The Python module fastopt._C, bound in parts (one file each, csrc/bindings/): the plans of the
// update rules, the Triton plan's grad binder, BatchNorm+ReLU with its autograd node in C++, the
// state buffer's carving and the CPU capability. The ops themselves are torch.ops.fastopt.* (csrc/ops.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

#include "fastopt/grad_binding.h"

namespace fastopt {
namespace bindings {

namespace py = pybind11;
using OptTensor = c10::optional<at::Tensor>;

// A plan's bind_grads() to Python: None when the plan is stale (rebuild it), else the counts
// (bound as they are, relaid, without a grad) of fastopt::BindResult.
inline py::object bind_result(const BindResult& r) {
  if (r.stale) return py::none();
  return py::make_tuple(r.bound, r.relaid, r.no_grad);
}

// bind_grads(owners=None, grads=None): with both given (the local shards of DTensor params and of
// their grads, None for an absent grad), those are bound instead of the plan's owners' .grad.
inline c10::optional<GivenGrads> given_grads(c10::optional<std::vector<at::Tensor>> owners,
                                             c10::optional<std::vector<OptTensor>> grads) {
  TORCH_CHECK(owners.has_value() == grads.has_value(), "bind_grads: give both owners and grads, or neither");
  if (!owners.has_value()) return c10::nullopt;
  GivenGrads given{std::move(*owners), {}};
  for (auto& g : *grads) given.grads.push_back(g.has_value() ? std::move(*g) : at::Tensor());
  return given;
}

void bind_plans(py::module& m);        // plans.cpp
void bind_grad_binder(py::module& m);  // grad_binder.cpp
void bind_bn_relu(py::module& m);      // bn_relu.cpp
void bind_state_buffer(py::module& m);  // state_buffer.cpp

}  // namespace bindings
}  // namespace fastopt
