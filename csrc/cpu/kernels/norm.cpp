// The norm pass of global-norm clipping on the CPU: per chunk, the sum of squares (L2) or the max
// |g| (inf) of the grads after the AMP unscale and the value clip, accumulated in float64.
// Compiled once per CPU capability (Note [capability kernels], ../kernels.h).
#include <ATen/Parallel.h>

#include <cmath>

#include "common.h"
#include "fastopt/grad_math.h"

namespace fastopt {
namespace cpu {
namespace FASTOPT_CPU_CAPABILITY {

namespace {

constexpr int kLanes = 16;  // independent accumulators: the loop vectorizes without reassociation

// Accumulates in float64 (exact enough for any size; the loop is memory-bound either way).
template <bool kL2, typename scalar_t>
NormPartial reduce_chunk(const scalar_t* __restrict__ x, int64_t n, double inv_scale, double clip) {
  double acc[kLanes] = {0};
  int64_t nans[kLanes] = {0};
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double g = prepare_grad<double>(static_cast<double>(x[i + j]), inv_scale, true, clip);
      if constexpr (kL2) {
        acc[j] += g * g;
      } else {
        const double a = std::fabs(g);
        acc[j] = a > acc[j] ? a : acc[j];
        nans[j] += (g != g);
      }
    }
  }
  for (int64_t i = body; i < n; ++i) {
    const double g = prepare_grad<double>(static_cast<double>(x[i]), inv_scale, true, clip);
    if constexpr (kL2) {
      acc[0] += g * g;
    } else {
      const double a = std::fabs(g);
      acc[0] = a > acc[0] ? a : acc[0];
      nans[0] += (g != g);
    }
  }
  NormPartial p;
  for (int j = 0; j < kLanes; ++j) {
    p.value = kL2 ? p.value + acc[j] : (acc[j] > p.value ? acc[j] : p.value);
    p.nans += nans[j];
  }
  return p;
}

}  // namespace

void norm_partials(const NormArgs& a, NormPartial* partials) {
  with_dtype(a.dtype, [&](auto s) {
    using S = decltype(s);
    at::parallel_for(0, a.n_chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const Chunk& c = a.chunks[i];
        if (a.ptrs[c.tensor] == no_grad_address()) continue;  // Note [absent grads]: the partial stays 0
        const S* data = static_cast<const S*>(a.ptrs[c.tensor]) + c.begin;
        partials[i] = a.l2 ? reduce_chunk<true>(data, c.end - c.begin, a.inv_scale, a.clip)
                           : reduce_chunk<false>(data, c.end - c.begin, a.inv_scale, a.clip);
      }
    });
  });
}

}  // namespace FASTOPT_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastopt
