// BatchNorm+ReLU host-side checks and shapes, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include "bn_relu_math.h"
#include "tensor_checks.h"

namespace fastopt {
namespace bn {

inline Shape shape_of(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input of at least 2 dimensions, got ", x.sizes());
  const int64_t n = x.size(0), c = x.size(1), s = x.numel() / std::max<int64_t>(n * c, 1);
  if (x.dim() == 2) return {n, c, 1, true};
  if (x.is_contiguous()) return {n, c, s, false};
  const bool cl = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  TORCH_CHECK(cl, op, ": the input must be contiguous or channels_last, got strides ", x.strides());
  return {n, c, s, true};
}

// float32 statistics and parameters for float32/float16/bfloat16 inputs, float64 for float64.
inline at::ScalarType stat_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_per_channel(const char* op, const char* what, const c10::optional<at::Tensor>& t,
                              const at::Tensor& x, int64_t c) {
  if (!t.has_value() || !t->defined()) return;
  check_plain(*t, op, what, 0);
  TORCH_CHECK(t->numel() == c, op, ": ", what, " has ", t->numel(), " elements for ", c, " channels");
  TORCH_CHECK(t->scalar_type() == stat_type(x), op, ": ", what, " is ", t->scalar_type(), " for a ",
              x.scalar_type(), " input (expected ", stat_type(x), ")");
  TORCH_CHECK(t->is_contiguous() && t->device() == x.device(), op, ": ", what,
              " must be contiguous and on the input's device");
}

// The argument checks of bn_relu_forward (CPU and CUDA alike); returns x's shape.
inline Shape check_forward(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                           const c10::optional<at::Tensor>& running_var, bool training) {
  check_plain(x, op, "input", 0);
  const Shape sh = shape_of(x, op);
  check_per_channel(op, "weight", weight, x, sh.c);
  check_per_channel(op, "bias", bias, x, sh.c);
  check_per_channel(op, "running_mean", running_mean, x, sh.c);
  check_per_channel(op, "running_var", running_var, x, sh.c);
  TORCH_CHECK(training || (running_mean.has_value() && running_var.has_value()), op,
              ": running statistics are required when training=False");
  return sh;
}

// The argument checks of bn_relu_backward; returns x's shape.
inline Shape check_backward(const char* op, const at::Tensor& dy, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& mean, const at::Tensor& invstd) {
  check_plain(x, op, "input", 0);
  check_plain(dy, op, "grad_output", 0);
  const Shape sh = shape_of(x, op);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.strides() == x.strides() && dy.scalar_type() == x.scalar_type(), op,
              ": grad_output must have the input's shape, layout and dtype");
  check_per_channel(op, "weight", weight, x, sh.c);
  check_per_channel(op, "bias", bias, x, sh.c);
  check_per_channel(op, "mean", mean, x, sh.c);
  check_per_channel(op, "invstd", invstd, x, sh.c);
  return sh;
}

template <typename T>
T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

}  // namespace bn
}  // namespace fastopt
