// Operator schemas of fastopt (torch.ops.fastopt.*), their Meta implementations (so torch.compile
// can trace a step) and the Python module fastopt._C.
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

namespace fastopt {
namespace {

at::Tensor multi_tensor_norm_meta(at::TensorList tensors, double /*norm_type*/,
                                  const c10::optional<at::Tensor>& /*inv_scale*/,
                                  c10::optional<double> /*clip_value*/) {
  const bool fp64 = !tensors.empty() && tensors[0].scalar_type() == at::kDouble;
  const auto device = tensors.empty() ? at::Device(at::kMeta) : tensors[0].device();
  return at::empty({}, at::TensorOptions().dtype(fp64 ? at::kDouble : at::kFloat).device(device));
}

}  // namespace

TORCH_LIBRARY(fastopt, m) {
  // The norm (2.0 or inf) of every element of `tensors` after `g * inv_scale` and the clamp to
  // [-clip_value, clip_value]; float32 (float64 for float64 input), NaN/inf propagate.
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type, Tensor? inv_scale, float? clip_value)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(fastopt, Meta, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_meta);
}

}  // namespace fastopt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastopt compiled ops; they register themselves as torch.ops.fastopt.*";
#ifdef FASTOPT_WITH_CUDA
  m.def("built_with_cuda", [] { return true; });
#else
  m.def("built_with_cuda", [] { return false; });
#endif
}
