// Host-side per-step scalars of the CPU update ops: AMP skip, gradient preparation, step counts
// and the learning rate, all read from CPU tensors (no device sync on the CPU).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

#include "fastopt/update_math.h"

namespace fastopt {
namespace cpu {

// GradScaler found inf/NaN: the step changes nothing at all (params, state, step counts).
inline bool skip_step(const c10::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<double>() != 0.0;
}

template <typename T>
GradPrep<T> read_grad_prep(const c10::optional<at::Tensor>& inv_scale, c10::optional<double> clip_value,
                           const c10::optional<at::Tensor>& clip_coef, bool maximize) {
  GradPrep<T> gp;
  gp.inv_scale = inv_scale.has_value() ? static_cast<T>(inv_scale->item<float>()) : T(1);
  gp.clip = clip_value.has_value() ? static_cast<T>(*clip_value) : std::numeric_limits<T>::infinity();
  gp.coef = clip_coef.has_value() ? static_cast<T>(clip_coef->item<double>()) : T(1);
  gp.sign = maximize ? T(-1) : T(1);
  return gp;
}

// Increments every step count (0-dim float32 tensors) and returns the new values.
inline std::vector<double> increment_steps(at::TensorList steps) {
  std::vector<double> out;
  out.reserve(steps.size());
  for (const auto& s : steps) {
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device().is_cpu(),
                "fastopt: step counts must be 1-element float32 CPU tensors");
    float* p = s.data_ptr<float>();
    *p += 1.0f;
    out.push_back(*p);
  }
  return out;
}

// The learning rate with torch.optim's arithmetic: a Python float computes in double; a float32
// tensor lr computes `lr / x` and `1 - lr * wd` in float32 (tensor-scalar ops in its dtype).
struct Lr {
  double value;
  bool fp32;

  explicit Lr(const at::Tensor& lr)
      : value(lr.item<double>()), fp32(lr.scalar_type() == at::kFloat) {
    TORCH_CHECK(lr.numel() == 1, "fastopt: lr must be a 1-element tensor");
  }
  double div(double x) const {
    return fp32 ? static_cast<double>(static_cast<float>(value) / static_cast<float>(x)) : value / x;
  }
  double decay(double wd) const {
    return fp32 ? static_cast<double>(1.0f - static_cast<float>(value) * static_cast<float>(wd))
                : 1.0 - value * wd;
  }
};

template <typename S>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

}  // namespace cpu
}  // namespace fastopt
