// The global gradient norm (2 or inf) and the clip coefficient on CUDA, in one launch.
//
// A persistent grid reduces each chunk of the (unscaled, value-clipped) grads to a float partial;
// the block that finishes last (a counter bumped after a fence) reduces the partials in a fixed
// order, in double, and writes [norm, min(max_norm / (norm + 1e-6), 1)]: the update kernel reads
// the coefficient from there. Deterministic (the result does not depend on which block ran
// which chunk) and free of host syncs. NaN and inf propagate as in clip_grad_norm_.
#include <torch/library.h>

#include <cmath>

#include "engine.cuh"
#include "fastopt/grad_math.h"

namespace fastopt {
namespace cuda {

namespace {

struct NormParams {
  const float* grad_scale;
  bool scale_is_inverse;
  double clip;  // +inf without value clipping
  double max_norm;
  bool write_coef;
  double* partials;
  int32_t* counter;
  void* out;  // [norm, coef] in the compute type (float64 for float64 grads, else float32)
};

// Block-wide reduction in a fixed order (warp shuffles, then the warps' results in order).
template <bool kL2, typename A>
__device__ A block_reduce(A x) {
  __shared__ A warp_results[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    const A y = __shfl_down_sync(0xffffffffu, x, offset);
    x = kL2 ? x + y : (y > x || y != y ? y : x);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_results[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kThreads / 32 ? warp_results[lane] : A(0);
    for (int offset = 16; offset > 0; offset /= 2) {
      const A y = __shfl_down_sync(0xffffffffu, x, offset);
      x = kL2 ? x + y : (y > x || y != y ? y : x);
    }
  }
  __syncthreads();  // warp_results is reused by the next call
  return x;         // valid in thread 0
}

// max that propagates NaN (torch's inf-norm of a tensor holding NaN is NaN)
template <typename A>
__device__ __forceinline__ A nan_max_(A a, A b) {
  return (b > a || b != b) ? b : a;
}

template <typename S, bool kL2>
__global__ void __launch_bounds__(kThreads) norm_kernel(Tables tb, NormParams prm) {
  using T = compute_t<S>;
  const T inv_scale = prm.grad_scale == nullptr ? T(1)
                      : prm.scale_is_inverse   ? static_cast<T>(*prm.grad_scale)
                                               : static_cast<T>(static_cast<float>(1.0 / static_cast<double>(*prm.grad_scale)));
  const T clip = static_cast<T>(prm.clip);
  for (int64_t c = blockIdx.x; c < tb.n_chunks; c += gridDim.x) {
    const int32_t t = tb.chunk_tensor[c];
    const int64_t start = tb.chunk_start[c];
    const int64_t end = tb.has_grad(t) ? min(tb.numels[t], start + kChunk) : start;  // absent: adds 0
    const S* g = tb.slot<const S>(kGradSlot, t);
    T acc = T(0);
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      const T x = prepare_grad<T>(static_cast<T>(g[i]), inv_scale, true, clip);
      acc = kL2 ? acc + x * x : nan_max_(acc, x < T(0) ? -x : x);
    }
    acc = block_reduce<kL2>(acc);
    if (threadIdx.x == 0) prm.partials[c] = static_cast<double>(acc);
  }
  // the last block to finish reduces the partials
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(prm.counter, 1) == static_cast<int32_t>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!last) return;
  double total = 0.0;
  for (int64_t c = threadIdx.x; c < tb.n_chunks; c += blockDim.x) {
    const double x = __ldcg(prm.partials + c);  // written by other blocks: skip L1
    total = kL2 ? total + x : (x > total || x != x ? x : total);
  }
  total = block_reduce<kL2>(total);
  if (threadIdx.x == 0) {
    T* out = static_cast<T*>(prm.out);
    const T norm = static_cast<T>(kL2 ? sqrt(total) : total);
    out[0] = norm;
    if (prm.write_coef) {
      // torch: clamp(max_norm / (norm + 1e-6), max=1) in the norm's dtype, where the division is
      // Tensor.__rtruediv__: reciprocal() * max_norm (two roundings); NaN stays NaN
      const T q = (T(1) / (norm + static_cast<T>(1e-6))) * static_cast<T>(prm.max_norm);
      out[1] = q > T(1) ? T(1) : q;
    }
    *prm.counter = 0;
  }
}

}  // namespace

static at::Tensor grad_norm_impl(const CudaPlan& plan, double norm_type, const c10::optional<at::Tensor>& grad_scale,
                          bool scale_is_inverse, c10::optional<double> clip_value, c10::optional<double> max_norm) {
  const bool l2 = norm_type == 2.0;
  TORCH_CHECK(l2 || (std::isinf(norm_type) && norm_type > 0), "multi_tensor_norm: norm_type must be 2.0 or inf, got ",
              norm_type);
  const at::ScalarType out_dtype = plan.dtype(1) == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(out_dtype).device(plan.device()));
  if (plan.size() == 0) {
    out.fill_(0.0);
    out[1].fill_(1.0);
    return out;
  }
  const c10::cuda::CUDAGuard guard(plan.device());
  const NormParams prm{float_ptr(grad_scale, "grad_scale", plan.device()),
                       scale_is_inverse,
                       clip_value.has_value() ? *clip_value : std::numeric_limits<double>::infinity(),
                       max_norm.has_value() ? *max_norm : 0.0,
                       max_norm.has_value(),
                       plan.partials(),
                       plan.norm_counter(),
                       out.data_ptr()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype(1), "fastopt_cuda_norm", [&] {
    with_bool(l2, [&](auto kL2) {
      norm_kernel<scalar_t, decltype(kL2)::value>
          <<<grid_size(plan.n_chunks()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(tables(plan), prm);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor grad_norm(const CudaPlan& plan, double norm_type, const c10::optional<at::Tensor>& grad_scale,
                     c10::optional<double> clip_value, c10::optional<double> max_norm) {
  return grad_norm_impl(plan, norm_type, grad_scale, false, clip_value, max_norm);
}

namespace {
// torch.ops.fastopt.multi_tensor_norm on CUDA tensors (a one-off plan over the grads).
at::Tensor multi_tensor_norm_cuda(at::TensorList tensors, double norm_type, const c10::optional<at::Tensor>& inv_scale,
                                  c10::optional<double> clip_value) {
  if (tensors.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
  std::vector<at::Tensor> list;
  for (const auto& t : tensors) list.push_back(t.contiguous());
  std::vector<at::Tensor> steps(list.size(), at::zeros({}, list[0].options().dtype(at::kFloat)));
  CudaPlan plan({{"grads", list}, {"grads", list}}, steps, {});  // the grads in slots 0 and kGradSlot
  return grad_norm_impl(plan, norm_type, inv_scale, /*scale_is_inverse=*/true, clip_value, c10::nullopt)[0];
}
}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cuda);
}

}  // namespace cuda
}  // namespace fastopt
