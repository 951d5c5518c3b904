// Vector memory accesses shared by the CUDA kernels (the optimizer engine, engine.cuh, and
// BatchNorm+ReLU, batch_norm_relu.cu): N values of X in one aligned access (16 bytes at most).
#pragma once

namespace fastopt {
namespace cuda {

template <typename X, int N>
struct alignas(sizeof(X) * N) Vec {
  X v[N];
};

// N values at `p`, which must be aligned to sizeof(X) * N bytes.
template <int N, typename X>
__device__ __forceinline__ Vec<X, N> load_vec(const X* __restrict__ p) {
  return *reinterpret_cast<const Vec<X, N>*>(p);
}

}  // namespace cuda
}  // namespace fastopt
