// Host-side per-step scalars of the CPU update ops: AMP skip, gradient preparation and the
// learning rate, all read from CPU tensors (no device sync on the CPU).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

#include "fastopt/update_math.h"

namespace fastopt {
namespace cpu {

// The shared tail of every update op (see FASTOPT_GRAD_ARGS in ops.cpp).
struct GradArgs {
  c10::optional<at::Tensor> inv_scale;
  c10::optional<double> clip_value;
  c10::optional<at::Tensor> clip_coef;
  c10::optional<at::Tensor> found_inf;

  // GradScaler found inf/NaN: the step changes nothing at all (params, state, step counts).
  bool skip() const { return found_inf.has_value() && found_inf->item<double>() != 0.0; }

  template <typename T>
  GradPrep<T> prep(bool maximize) const {
    GradPrep<T> gp;
    gp.inv_scale = inv_scale.has_value() ? static_cast<T>(inv_scale->item<float>()) : T(1);
    gp.clip = clip_value.has_value() ? static_cast<T>(*clip_value) : std::numeric_limits<T>::infinity();
    gp.coef = clip_coef.has_value() ? static_cast<T>(clip_coef->item<double>()) : T(1);
    gp.sign = maximize ? T(-1) : T(1);
    return gp;
  }
};

// The learning rate of a step, read from its (CPU) tensor: fastopt::LrValue's arithmetic.
struct Lr : LrValue {
  explicit Lr(const at::Tensor& lr) : LrValue{0.0, lr.scalar_type() == at::kFloat} {
    TORCH_CHECK(lr.numel() == 1, "fastopt: lr must be a 1-element tensor");
    value = lr.item<double>();
  }
};

// Per-tensor scalars that depend only on the step count: computed once per distinct count
// (usually one per step for the whole group).
template <typename Scalars, typename Fn>
std::vector<Scalars> per_step_scalars(const std::vector<double>& steps, const Fn& make) {
  std::vector<Scalars> out(steps.size());
  double last = std::numeric_limits<double>::quiet_NaN();
  Scalars cached{};
  for (size_t i = 0; i < steps.size(); ++i) {
    if (steps[i] != last) {
      last = steps[i];
      cached = make(last);
    }
    out[i] = cached;
  }
  return out;
}

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
