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

  // The gradient preparation in double (the kernels round it to their compute type): unscale
  // factor, value clip, norm-clip coefficient, maximize sign; neutral values when absent.
  GradPrep<double> prep(bool maximize) const {
    GradPrep<double> gp;
    gp.inv_scale = inv_scale.has_value() ? static_cast<double>(inv_scale->item<float>()) : 1.0;
    gp.clip = clip_value.has_value() ? *clip_value : std::numeric_limits<double>::infinity();
    gp.coef = clip_coef.has_value() ? clip_coef->item<double>() : 1.0;
    gp.sign = maximize ? -1.0 : 1.0;
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

}  // namespace cpu
}  // namespace fastopt
