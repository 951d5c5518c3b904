// Host-side per-step scalars of the CPU update ops: the learning rate, read from a CPU tensor
// (the grad transform is fastopt::GradArgs, update_op.h).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

#include "fastopt/update_op.h"

namespace fastopt {
namespace cpu {

// The learning rate of a step, read from its (CPU) tensor: fastopt::LrValue's arithmetic.
struct Lr : LrValue {
  explicit Lr(const at::Tensor& lr) : LrValue{0.0, lr.scalar_type() == at::kFloat} {
    TORCH_CHECK(lr.numel() == 1, "fastopt: lr must be a 1-element tensor");
    value = lr.item<double>();
  }
};

}  // namespace cpu
}  // namespace fastopt
