// The CUDA multi-tensor engine: one persistent-grid kernel walks a plan's chunk table and calls an
// optimizer functor per chunk (Note [CUDA tables in device memory], plan.h). The per-element math
// is fastopt/update_math.h, shared with the CPU kernels.
#pragma once

// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which needs the cuBLAS and cuSPARSE
// headers): `make cuda-check` compiles these files with a bare nvcc.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "fastopt/dispatch.h"
#include "fastopt/update_math.h"
#include "plan.h"
#include "vec.cuh"

namespace fastopt {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // elements per vector access: 16 bytes of fp32

// The plan's device tables, passed by value to the kernels.
struct Tables {
  const int32_t* chunk_tensor;
  const int64_t* chunk_start;
  const int64_t* numels;
  void* const* ptrs;  // [slot][tensor]
  int64_t n_tensors;
  int64_t n_chunks;
  const uint8_t* aligned;
  float* const* steps;
  const int64_t* ranges;  // Note [ranges on the GPU] (fastopt/range_table.h): the update's chunks
  const int64_t* per_tensor;  // offset in its range, chunks covering it
  int64_t n_update_chunks;
  int32_t* done;
  const int64_t* seeds;  // one per tensor: the random streams of the stochastic stores (or unused)

  template <typename X>
  __device__ X* slot(int s, int32_t t) const {
    return static_cast<X*>(ptrs[s * n_tensors + t]);
  }

  // Note [absent grads] (fastopt/grad_binding.h): a param without a grad this step is skipped.
  __device__ bool has_grad(int32_t t) const { return slot<void>(kGradSlot, t) != no_grad_address(); }
};

inline Tables tables(const CudaPlan& plan) {
  return Tables{plan.chunk_tensor(), plan.chunk_start(),  plan.numels(),           plan.ptrs(),
                plan.size(),         plan.n_chunks(),     plan.aligned(),          plan.steps(),
                plan.range_chunks(), plan.range_per_tensor(), plan.update_chunks(), plan.done(),
                plan.seeds()};
}

// Blocks of a persistent grid: enough to fill the GPU, never more than there are chunks.
inline int grid_size(int64_t n_chunks) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_chunks, static_cast<int64_t>(sms) * 8)));
}

// N values of X to `ptr` at index i as they are (one aligned vector access for N = kVec).
template <int N, typename X>
__device__ __forceinline__ void store_values(X* ptr, int64_t i, const X (&in)[N]) {
  Vec<X, N> v;
#pragma unroll
  for (int k = 0; k < N; ++k) v.v[k] = in[k];
  *reinterpret_cast<Vec<X, N>*>(ptr + i) = v;
}

// N elements of `ptr` from index i into T registers (N = kVec: one aligned vector access).
template <int N, typename T, typename X>
__device__ __forceinline__ void load(const X* ptr, int64_t i, T (&out)[N]) {
  const Vec<X, N> v = load_vec<N>(ptr + i);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = static_cast<T>(v.v[k]);
}

template <int N, typename T, typename X>
__device__ __forceinline__ void store(X* ptr, int64_t i, const T (&in)[N]) {
  Vec<X, N> v;
#pragma unroll
  for (int k = 0; k < N; ++k) v.v[k] = static_cast<X>(in[k]);
  *reinterpret_cast<Vec<X, N>*>(ptr + i) = v;
}

// The learning rate as the kernels see it: a device tensor's value (float32 or float64) or a
// value fixed at launch.
struct DeviceLr {
  const void* ptr;
  bool is_double;
  bool fp32;  // torch's arithmetic for a float32 tensor lr (LrValue)
  double value;

  __device__ LrValue read() const {
    if (ptr == nullptr) return LrValue{value, fp32};
    const double v = is_double ? *static_cast<const double*>(ptr) : static_cast<double>(*static_cast<const float*>(ptr));
    return LrValue{v, fp32};
  }
};

inline DeviceLr device_lr(const CudaLr& lr, const at::Device& device) {
  if (lr.tensor.has_value()) {
    const at::Tensor& t = *lr.tensor;
    TORCH_CHECK(t.numel() == 1 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                "fastopt (cuda): a tensor lr must be one float32 or float64 element");
    TORCH_CHECK(t.device() == device, "fastopt (cuda): the lr tensor is on ", t.device(), ", the params on ", device);
    return DeviceLr{t.data_ptr(), t.scalar_type() == at::kDouble, t.scalar_type() == at::kFloat, 0.0};
  }
  return DeviceLr{nullptr, false, lr.fp32, lr.value};
}

// The lr argument of a list op: a tensor on the params' device is read by the kernel; a CPU
// tensor is read here (a host read, no device sync).
inline CudaLr list_op_lr(const at::Tensor& lr, const at::Device& device) {
  TORCH_CHECK(lr.numel() == 1, "fastopt (cuda): lr must be a 1-element tensor");
  if (lr.device() == device) return CudaLr{lr, 0.0, lr.scalar_type() == at::kFloat};
  TORCH_CHECK(lr.is_cpu(), "fastopt (cuda): the lr tensor is on ", lr.device(), ", the params on ", device);
  return CudaLr{c10::nullopt, lr.item<double>(), lr.scalar_type() == at::kFloat};
}

// The gradient transform as the kernels see it.
struct DeviceGradArgs {
  const float* grad_scale;
  const void* clip_coef;  // float32, or float64 (coef_double) for float64 groups
  const float* found_inf;
  double clip;  // +inf when value clipping is off
  bool maximize;
  bool scale_is_inverse;
  bool coef_double;

  template <typename T>
  __device__ GradPrep<T> read() const {
    GradPrep<T> gp;
    // 1/scale as GradScaler.unscale_ computes it: in float64, rounded once to float32.
    if (grad_scale == nullptr) {
      gp.inv_scale = T(1);
    } else {
      gp.inv_scale = scale_is_inverse ? static_cast<T>(*grad_scale)
                                      : static_cast<T>(static_cast<float>(1.0 / static_cast<double>(*grad_scale)));
    }
    gp.clip = static_cast<T>(clip);
    if (clip_coef == nullptr) {
      gp.coef = T(1);
    } else {
      gp.coef = coef_double ? static_cast<T>(*static_cast<const double*>(clip_coef))
                            : static_cast<T>(*static_cast<const float*>(clip_coef));
    }
    gp.sign = maximize ? T(-1) : T(1);
    return gp;
  }
  // Whether the transform can change a gradient at all (Note [neutral grad prep]); decided on the
  // host from what is present, since the values live on the device.
  bool active() const {
    return grad_scale != nullptr || clip_coef != nullptr || clip != std::numeric_limits<double>::infinity() ||
           maximize;
  }
};

inline const float* float_ptr(const c10::optional<at::Tensor>& t, const char* what, const at::Device& device) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == device, "fastopt (cuda): ",
              what, " must be a 1-element float32 tensor on ", device);
  return t->data_ptr<float>();
}

inline DeviceGradArgs device_grad_args(const GradArgs& g, bool maximize, const at::Device& device) {
  const void* coef = nullptr;
  bool coef_double = false;
  if (g.clip_coef.has_value()) {
    const at::Tensor& c = *g.clip_coef;
    TORCH_CHECK(c.numel() == 1 && (c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble) &&
                    c.device() == device,
                "fastopt (cuda): clip_coef must be a 1-element float32 or float64 tensor on ", device);
    coef = c.data_ptr();
    coef_double = c.scalar_type() == at::kDouble;
  }
  return DeviceGradArgs{float_ptr(g.scale, "grad_scale", device), coef, float_ptr(g.found_inf, "found_inf", device),
                        g.clip_value.has_value() ? *g.clip_value : std::numeric_limits<double>::infinity(), maximize,
                        g.scale_is_inverse, coef_double};
}

// Calls op.template apply<N>(i) for the chunk's elements: N = kVec over the aligned body when every
// slot of the tensor is aligned, N = 1 otherwise and for the tail.
template <typename Op>
__device__ __forceinline__ void for_each_element(Op& op, int64_t start, int64_t end, bool aligned) {
  int64_t tail = start;
  if (aligned) {
    const int64_t body_end = start + (end - start) / kVec * kVec;
    for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec; i < body_end;
         i += static_cast<int64_t>(blockDim.x) * kVec) {
      op.template apply<kVec>(i);
    }
    tail = body_end;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) op.template apply<1>(i);
}

static_assert(RangeTable::kMaxTensors <= kThreads, "a thread per tensor a chunk covers");

// Note [one-launch step counts] (triton_kernels/multi_tensor.py): every block that works on a
// chunk covering tensor u has read its step count before it bumps done[u]; the block that
// completes the count writes step + 1 and resets the counter for the next launch. Thread i
// finishes tensor a + i of the block's chunk (its count read again before its bump).
__device__ __forceinline__ void finish_steps(const Tables& tb, int64_t a, int64_t b) {
  __syncthreads();  // every thread of this block has used the step counts
  const int64_t u = a + static_cast<int64_t>(threadIdx.x);
  if (u > b) return;
  const float step = *tb.steps[u] + 1.0f;
  const int64_t count = tb.per_tensor[2 * u + 1];
  if (count == 1) {
    *tb.steps[u] = step;
  } else {
    __threadfence();
    if (atomicAdd(tb.done + u, 1) == count - 1) {
      *tb.steps[u] = step;
      tb.done[u] = 0;
    }
  }
}

// The update kernel: a persistent grid over the range table (Note [ranges on the GPU],
// fastopt/range_table.h). A chunk [lo, hi) of a range is walked from the range's first tensor t0
// (whose addresses are the range's) as one tensor when the tensors it covers, a to b (at most
// kMaxTensors: a thread each checks one), have the same step count; else tensor by tensor, each
// its part with its own count (slower, the same results). `Chunk` is constructed from (tables,
// tensor, step, the first index) and provides apply<N>(i); every thread reads the same table
// entries, so the block never diverges.
template <typename Chunk, typename Params>
__global__ void __launch_bounds__(kThreads) update_kernel(Tables tb, Params prm) {
  if (prm.ga.found_inf != nullptr && *prm.ga.found_inf != 0.0f) return;  // GradScaler: skip the step
  for (int64_t c = blockIdx.x; c < tb.n_update_chunks; c += gridDim.x) {
    const int64_t* row = tb.ranges + c * RangeTable::kRow;
    const auto t0 = static_cast<int32_t>(row[0]);
    if (!tb.has_grad(t0)) continue;  // a tensor without a grad is never joined
    const int64_t a = row[1], b = row[2], lo = row[3], hi = row[4];
    const float count = *tb.steps[a];
    const int64_t mine = a + static_cast<int64_t>(threadIdx.x);
    if (__syncthreads_or(mine <= b && *tb.steps[mine] != count) == 0) {
      Chunk op(tb, t0, count + 1.0f, lo, prm);
      for_each_element(op, lo, hi, tb.aligned[t0] != 0);
    } else {
      for (int64_t u = a; u <= b; ++u) {
        const int64_t offset = tb.per_tensor[2 * u];
        const int64_t start = max(lo, offset), end = min(hi, offset + tb.numels[u]);
        Chunk op(tb, t0, *tb.steps[u] + 1.0f, start, prm);
        for_each_element(op, start, end, tb.aligned[t0] != 0 && start % kVec == 0);
      }
    }
    finish_steps(tb, a, b);
  }
}

template <typename Chunk, typename Params>
void launch_update(const CudaPlan& plan, const Params& prm) {
  if (plan.size() == 0) return;
  const c10::cuda::CUDAGuard guard(plan.device());
  update_kernel<Chunk, Params><<<grid_size(plan.update_chunks()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      tables(plan), prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

}  // namespace cuda
}  // namespace fastopt
