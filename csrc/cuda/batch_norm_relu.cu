// fastopt::bn_relu_forward / bn_relu_backward on CUDA: BatchNorm followed by ReLU.
//
// Forward (training): a statistics kernel whose grid splits every channel's N*S values over
// several blocks (float partial sums, Note [shifted sums]), a finalize kernel (one thread per
// channel: partials combined in double in a fixed order, running statistics, scale and shift),
// and one elementwise normalize+ReLU pass. Backward: the same shape, with the sums of g and
// g * (x - mean) (g = dy where the recomputed z > 0), then the dx pass. No host syncs; results do
// not depend on block scheduling.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "fastopt/bn_relu_host.h"
#include "fastopt/bn_relu_math.h"

namespace fastopt {
namespace cuda {
namespace {

using bn::Shape;
constexpr int kThreads = 256;
constexpr int kClChannels = 32;                   // channels_last: channels per block (one warp row)
constexpr int kClRows = kThreads / kClChannels;   // rows per block step
constexpr int kUnroll = 4;                        // elementwise: values per thread per step

template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Note [32-bit division]: the NCS kernels find a value's sample (or channel) by an integer
// division per value; in 32 bits when the tensor has fewer than 2^32 values (I = uint32_t, far
// cheaper on the GPU), in 64 bits otherwise. Offsets are always formed in 64 bits.
template <typename I>
__device__ __forceinline__ int64_t ncs_offset(const Shape& sh, int64_t c, int64_t p) {
  const int64_t n = static_cast<int64_t>(static_cast<I>(p) / static_cast<I>(sh.s));  // p = n * s + spatial
  return (n * sh.c + c) * sh.s + (p - n * sh.s);
}

// fn(I{}) with I the index type of Note [32-bit division].
template <typename Fn>
void with_index_type(int64_t values, Fn&& fn) {
  if (values < (int64_t{1} << 32)) {
    fn(uint32_t{});
  } else {
    fn(uint64_t{});
  }
}

// The per-value terms of the two reduction passes (Note [shifted sums] and the backward sums).
template <typename S, bool kGrad>
struct Terms {
  const S* x;
  const S* dy;
  using T = acc_t<S>;
  __device__ __forceinline__ void add(int64_t off, T k, T scale, T shift, T& a, T& b) const {
    const T xv = static_cast<T>(x[off]);
    if constexpr (kGrad) {
      const T g = fma(xv, scale, shift) > T(0) ? static_cast<T>(dy[off]) : T(0);
      a += g;
      b += g * (xv - k);  // k is the mean here
    } else {
      const T d = xv - k;
      a += d;
      b += d * d;
    }
  }
};

template <typename T>
__device__ T block_sum(T v, T* smem) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += smem[w];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

// Reduction pass, NCS layout: block (channel, split) sums its slice of the channel's values.
// `vec` holds per-channel k (moments) or [scale, shift, mean] (grad sums), each `c` long.
template <typename S, bool kGrad, typename I>
__global__ void __launch_bounds__(kThreads)
    sums_ncs_kernel(Terms<S, kGrad> terms, Shape sh, const acc_t<S>* vec, acc_t<S>* part, int splits) {
  using T = acc_t<S>;
  __shared__ T smem[kThreads / 32];
  const int64_t c = blockIdx.x, count = sh.count();
  const int64_t p0 = count * blockIdx.y / splits, p1 = count * (blockIdx.y + 1) / splits;
  const T k = kGrad ? vec[2 * sh.c + c] : vec[c];
  const T scale = kGrad ? vec[c] : T(0), shift = kGrad ? vec[sh.c + c] : T(0);
  T a = 0, b = 0;
  for (int64_t p = p0 + threadIdx.x; p < p1; p += kThreads) terms.add(ncs_offset<I>(sh, c, p), k, scale, shift, a, b);
  a = block_sum(a, smem);
  b = block_sum(b, smem);
  if (threadIdx.x == 0) {
    part[blockIdx.y * sh.c + c] = a;
    part[(splits + blockIdx.y) * sh.c + c] = b;
  }
}

// Reduction pass, channels_last: block (32 channels, split of the rows); threads (c, row) with
// consecutive c on consecutive lanes (coalesced), then the 8 row-partials summed in order.
template <typename S, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    sums_cl_kernel(Terms<S, kGrad> terms, Shape sh, const acc_t<S>* vec, acc_t<S>* part, int splits) {
  using T = acc_t<S>;
  __shared__ T sa[kClRows][kClChannels], sb[kClRows][kClChannels];
  const int tx = threadIdx.x % kClChannels, ty = threadIdx.x / kClChannels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kClChannels + tx, rows = sh.count();
  const int64_t r0 = rows * blockIdx.y / splits, r1 = rows * (blockIdx.y + 1) / splits;
  T a = 0, b = 0;
  if (c < sh.c) {
    const T k = kGrad ? vec[2 * sh.c + c] : vec[c];
    const T scale = kGrad ? vec[c] : T(0), shift = kGrad ? vec[sh.c + c] : T(0);
    for (int64_t r = r0 + ty; r < r1; r += kClRows) terms.add(r * sh.c + c, k, scale, shift, a, b);
  }
  sa[ty][tx] = a;
  sb[ty][tx] = b;
  __syncthreads();
  if (ty == 0 && c < sh.c) {
    for (int r = 1; r < kClRows; ++r) {
      a += sa[r][tx];
      b += sb[r][tx];
    }
    part[blockIdx.y * sh.c + c] = a;
    part[(splits + blockIdx.y) * sh.c + c] = b;
  }
}

// k[c]: the channel's first value (the shift of Note [shifted sums]).
template <typename S>
__global__ void first_values_kernel(const S* x, Shape sh, acc_t<S>* k) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < sh.c) k[c] = sh.count() > 0 ? static_cast<acc_t<S>>(x[sh.channels_last ? c : c * sh.s]) : acc_t<S>(0);
}

// Forward finalize, one thread per channel: statistics from the partials (training) or the
// running ones, running statistics moved, then scale and shift for the normalize pass.
template <typename T>
__global__ void finalize_forward_kernel(Shape sh, const T* part, int splits, const T* k, const T* weight,
                                        const T* bias, T* running_mean, T* running_var, bool training,
                                        double momentum, double eps, T* mean, T* invstd, T* scale, T* shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= sh.c) return;
  double m, istd;
  if (training) {
    double s1 = 0.0, s2 = 0.0;
    for (int i = 0; i < splits; ++i) {
      s1 += static_cast<double>(part[i * sh.c + c]);
      s2 += static_cast<double>(part[(splits + i) * sh.c + c]);
    }
    const bn::Moments mo = bn::moments(static_cast<double>(k[c]), s1, s2, sh.count());
    m = mo.mean;
    istd = 1.0 / sqrt(mo.var + eps);
    if (running_mean) running_mean[c] = static_cast<T>(bn::running_update(running_mean[c], mo.mean, momentum));
    if (running_var) {
      running_var[c] = static_cast<T>(bn::running_update(running_var[c], bn::unbiased(mo.var, sh.count()), momentum));
    }
  } else {
    m = static_cast<double>(running_mean[c]);
    istd = 1.0 / sqrt(static_cast<double>(running_var[c]) + eps);
  }
  mean[c] = static_cast<T>(m);
  invstd[c] = static_cast<T>(istd);
  const bn::Affine<T> af = bn::affine<T>(static_cast<double>(mean[c]), static_cast<double>(invstd[c]), weight, bias, c);
  scale[c] = af.scale;
  shift[c] = af.shift;
}

// Backward: [scale, shift, mean] per channel from the saved mean and invstd, by the forward's
// formula (so the recomputed ReLU mask is the forward's).
template <typename T>
__global__ void affine_kernel(int64_t channels, const T* mean, const T* invstd, const T* weight, const T* bias,
                              T* vec) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const bn::Affine<T> af = bn::affine<T>(static_cast<double>(mean[c]), static_cast<double>(invstd[c]), weight, bias, c);
  vec[c] = af.scale;
  vec[channels + c] = af.shift;
  vec[2 * channels + c] = mean[c];
}

// Backward finalize: dweight, dbias and the dx coefficients [k_g, k_c, k_0] per channel.
template <typename T>
__global__ void finalize_backward_kernel(Shape sh, const T* part, int splits, const T* invstd, const T* scale,
                                         bool training, T* dweight, T* dbias, T* coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= sh.c) return;
  double sum_g = 0.0, sum_gc = 0.0;
  for (int i = 0; i < splits; ++i) {
    sum_g += static_cast<double>(part[i * sh.c + c]);
    sum_gc += static_cast<double>(part[(splits + i) * sh.c + c]);
  }
  dweight[c] = static_cast<T>(sum_gc * static_cast<double>(invstd[c]));
  dbias[c] = static_cast<T>(sum_g);
  const bn::InputGrad<T> ig = bn::input_grad<T>(scale[c], invstd[c], sum_g, sum_gc, sh.count(), training);
  coef[c] = ig.k_g;
  coef[sh.c + c] = ig.k_c;
  coef[2 * sh.c + c] = ig.k_0;
}

// Elementwise passes over all n*c*s values (kUnroll per thread per step, strided so each step is
// coalesced). kGrad=false: y = max(fma(x, scale, shift), 0); true: dx from dy and the coefficients.
template <typename S, bool kGrad, typename I>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const S* x, const S* dy, S* out, Shape sh, const acc_t<S>* vec, const acc_t<S>* coef,
                       int64_t total) {
  using T = acc_t<S>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < total;
       base += step) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i >= total) break;
      const auto ii = static_cast<I>(i);
      const int64_t c = static_cast<int64_t>(sh.channels_last ? ii % static_cast<I>(sh.c)
                                                              : (ii / static_cast<I>(sh.s)) % static_cast<I>(sh.c));
      const T xv = static_cast<T>(x[i]);
      const T z = fma(xv, vec[c], vec[sh.c + c]);
      if constexpr (kGrad) {
        const T g = z > T(0) ? static_cast<T>(dy[i]) : T(0);
        out[i] = static_cast<S>(coef[c] * g + coef[sh.c + c] * (xv - vec[2 * sh.c + c]) + coef[2 * sh.c + c]);
      } else {
        out[i] = static_cast<S>(z > T(0) ? z : (z != z ? z : T(0)));
      }
    }
  }
}

int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Blocks along the values of a channel: about 4 blocks per SM in all, each with >= 1024 values.
int splits_for(const Shape& sh, int64_t channel_blocks, int64_t values_per_split) {
  const int64_t target = (4 * static_cast<int64_t>(sm_count()) + channel_blocks - 1) / channel_blocks;
  const int64_t most = std::max<int64_t>(1, sh.count() / values_per_split);
  return static_cast<int>(std::clamp<int64_t>(target, 1, std::min<int64_t>(most, 65535)));
}

template <typename S, bool kGrad>
at::Tensor channel_sums(const Terms<S, kGrad>& terms, const Shape& sh, const at::Tensor& vec, int& splits) {
  using T = acc_t<S>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t cblocks = sh.channels_last ? (sh.c + kClChannels - 1) / kClChannels : sh.c;
  TORCH_CHECK(cblocks <= std::numeric_limits<int>::max(), "fastopt::bn_relu: too many channels");
  splits = splits_for(sh, cblocks, 1024);
  at::Tensor part = at::empty({2, splits, sh.c}, vec.options());
  const dim3 grid(static_cast<unsigned>(cblocks), static_cast<unsigned>(splits));
  if (sh.channels_last) {
    sums_cl_kernel<S, kGrad><<<grid, kThreads, 0, stream>>>(terms, sh, vec.data_ptr<T>(), part.data_ptr<T>(), splits);
  } else {
    with_index_type(sh.count(), [&](auto index) {
      sums_ncs_kernel<S, kGrad, decltype(index)>
          <<<grid, kThreads, 0, stream>>>(terms, sh, vec.data_ptr<T>(), part.data_ptr<T>(), splits);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part;
}

template <typename S, bool kGrad>
void elementwise(const S* x, const S* dy, S* out, const Shape& sh, const at::Tensor& vec, const at::Tensor* coef) {
  using T = acc_t<S>;
  const int64_t total = sh.count() * sh.c;
  if (total == 0) return;
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t blocks = std::min<int64_t>((total + per_block - 1) / per_block, 16 * static_cast<int64_t>(sm_count()));
  with_index_type(total, [&](auto index) {
    elementwise_kernel<S, kGrad, decltype(index)>
        <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            x, dy, out, sh, vec.data_ptr<T>(), coef ? coef->data_ptr<T>() : nullptr, total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned channel_grid(int64_t c) { return static_cast<unsigned>((c + kThreads - 1) / kThreads); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps) {
  constexpr const char* op = "fastopt::bn_relu_forward";
  const Shape sh = bn::check_forward(op, x, weight, bias, running_mean, running_var, training);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stat_opts = x.options().dtype(bn::stat_type(x));
  at::Tensor mean = at::empty({sh.c}, stat_opts), invstd = at::empty({sh.c}, stat_opts);
  at::Tensor vec = at::empty({2 * sh.c}, stat_opts);  // scale, shift
  at::Tensor y = at::empty_like(x);
  if (sh.c == 0) return {y, mean, invstd};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_forward_cuda", [&] {
    using S = scalar_t;
    using T = acc_t<S>;
    const S* xp = x.data_ptr<S>();
    at::Tensor part, k = at::empty({sh.c}, stat_opts);
    int splits = 0;
    if (training) {
      first_values_kernel<S><<<channel_grid(sh.c), kThreads, 0, stream>>>(xp, sh, k.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      part = channel_sums<S, false>({xp, nullptr}, sh, k, splits);
    }
    finalize_forward_kernel<T><<<channel_grid(sh.c), kThreads, 0, stream>>>(
        sh, training ? part.data_ptr<T>() : nullptr, splits, k.data_ptr<T>(), bn::data_or_null<T>(weight),
        bn::data_or_null<T>(bias), bn::data_or_null<T>(running_mean), bn::data_or_null<T>(running_var), training,
        momentum, eps, mean.data_ptr<T>(), invstd.data_ptr<T>(), vec.data_ptr<T>(), vec.data_ptr<T>() + sh.c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    elementwise<S, false>(xp, nullptr, y.data_ptr<S>(), sh, vec, nullptr);
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    bool need_input_grad) {
  constexpr const char* op = "fastopt::bn_relu_backward";
  const Shape sh = bn::check_backward(op, dy, x, weight, bias, mean, invstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stat_opts = x.options().dtype(bn::stat_type(x));
  at::Tensor dweight = at::empty({sh.c}, stat_opts), dbias = at::empty({sh.c}, stat_opts);
  at::Tensor dx = need_input_grad ? at::empty_like(x) : at::empty({0}, x.options());
  // [scale, shift, mean] per channel, as the reduction and dx passes read them
  at::Tensor vec = at::empty({3 * sh.c}, stat_opts), coef = at::empty({3 * sh.c}, stat_opts);
  if (sh.c == 0) return {dx, dweight, dbias};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_cuda", [&] {
    using S = scalar_t;
    using T = acc_t<S>;
    affine_kernel<T><<<channel_grid(sh.c), kThreads, 0, stream>>>(
        sh.c, mean.data_ptr<T>(), invstd.data_ptr<T>(), bn::data_or_null<T>(weight), bn::data_or_null<T>(bias),
        vec.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    int splits = 0;
    const at::Tensor part = channel_sums<S, true>({x.data_ptr<S>(), dy.data_ptr<S>()}, sh, vec, splits);
    finalize_backward_kernel<T><<<channel_grid(sh.c), kThreads, 0, stream>>>(
        sh, part.data_ptr<T>(), splits, invstd.data_ptr<T>(), vec.data_ptr<T>(), training, dweight.data_ptr<T>(),
        dbias.data_ptr<T>(), coef.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_input_grad) {
      elementwise<S, true>(x.data_ptr<S>(), dy.data_ptr<S>(), dx.data_ptr<S>(), sh, vec, &coef);
    }
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("bn_relu_forward", &bn_relu_forward);
  m.impl("bn_relu_backward", &bn_relu_backward);
}

}  // namespace cuda
}  // namespace fastopt
