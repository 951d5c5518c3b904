// Per-element gradient preparation, shared by every backend (C++ now, CUDA later): the one place
// that says what "unscale, then clamp" means, so the kernels cannot drift apart.
#pragma once

#include "fastopt/macros.h"

namespace fastopt {

// g * inv_scale, then clamped to [-clip, clip] when has_clip. NaN stays NaN (as torch.clamp).
template <typename acc_t>
FASTOPT_HD acc_t prepare_grad(acc_t g, acc_t inv_scale, bool has_clip, acc_t clip) {
  g = g * inv_scale;
  if (has_clip) {
    g = g < -clip ? -clip : g;
    g = g > clip ? clip : g;
  }
  return g;
}

}  // namespace fastopt
