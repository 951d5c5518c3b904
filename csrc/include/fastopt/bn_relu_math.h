// BatchNorm+ReLU per-channel math shared by the CPU and CUDA kernels (the specification is
// fastopt/reference/batch_norm_relu.py). Host and device code; no ATen.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace fastopt {
namespace bn {

// x viewed as (n, c, s): contiguous NC(spatial), or channels_last (rows of c values, n * s rows);
// a 2-D (n, c) input is the latter with s = 1.
struct Shape {
  int64_t n, c, s;
  bool channels_last;
  FASTOPT_HD int64_t count() const { return n * s; }  // values per channel
};

// Note [shifted sums]: the statistics kernels accumulate s1 = sum(x - k) and s2 = sum((x - k)^2)
// with k one value of the channel (its first), so var = s2/M - (s1/M)^2 does not cancel when
// |mean| >> std; partial sums are float within a row or a block of rows and double across them.
struct Moments {
  double mean, var;  // var is the biased (population) variance
};

FASTOPT_HD Moments moments(double k, double s1, double s2, int64_t count) {
  const double d = s1 / static_cast<double>(count);
  const double var = s2 / static_cast<double>(count) - d * d;
  return {k + d, var > 0.0 ? var : 0.0};
}

// `running = (1 - momentum) * running + momentum * stat`, the unbiased variance for running_var,
// in torch's order (momentum * stat + (1 - momentum) * running).
FASTOPT_HD double running_update(double running, double stat, double momentum) {
  return momentum * stat + (1.0 - momentum) * running;
}
FASTOPT_HD double unbiased(double var, int64_t count) {
  return var * static_cast<double>(count) / static_cast<double>(count - 1);
}

// z = x * scale + shift (one fma, the same in forward and backward so the recomputed ReLU mask
// matches the forward's bit for bit), y = max(z, 0).
template <typename T>
struct Affine {
  T scale, shift;
};
template <typename T>
FASTOPT_HD Affine<T> affine(double mean, double invstd, const T* weight, const T* bias, int64_t c) {
  const double scale = weight ? static_cast<double>(weight[c]) * invstd : invstd;
  const double shift = (bias ? static_cast<double>(bias[c]) : 0.0) - mean * scale;
  return {static_cast<T>(scale), static_cast<T>(shift)};
}

// Backward: with g = dy * (z > 0), sum_g = sum(g) and sum_gc = sum(g * (x - mean)),
// dx = k_g * g + k_c * (x - mean) + k_0, dweight = sum_gc * invstd, dbias = sum_g.
template <typename T>
struct InputGrad {
  T k_g, k_c, k_0;
};
template <typename T>
FASTOPT_HD InputGrad<T> input_grad(double scale, double invstd, double sum_g, double sum_gc, int64_t count,
                                   bool batch_stats) {
  if (!batch_stats) return {static_cast<T>(scale), T(0), T(0)};
  const double m = static_cast<double>(count);
  const double dweight = sum_gc * invstd;
  return {static_cast<T>(scale), static_cast<T>(-scale * invstd * dweight / m), static_cast<T>(-scale * sum_g / m)};
}

}  // namespace bn
}  // namespace fastopt
