// fastopt::bn_relu_forward / bn_relu_backward on CUDA: BatchNorm followed by ReLU.
//
// Two launches per direction (training): a reduction kernel whose grid splits every channel's
// N*S values over several blocks, each writing a float partial, the last block of each channel
// block combining the partials in double and finalizing (Note [last block finalizes]); then one
// elementwise pass. Forward: the statistics (Note [shifted sums]), then mean, invstd, the running
// statistics, scale and shift; y = max(fma(x, scale, shift), 0). Backward: the sums of g and
// g * (x - mean) (g = dy where the recomputed z > 0), then dweight, dbias and the dx coefficients;
// dx. Eval forward: a per-channel kernel and the elementwise pass. No host syncs; results do not
// depend on block scheduling.
//
// Note [16-byte packs]: every pass reads and writes 16 bytes per access (4 fp32, 8 bf16/fp16,
// 2 fp64 values) when the layout allows it: NCS with S a multiple of the pack (every ResNet
// layer's H*W but 7x7 and bf16 14x14), channels_last with C a multiple of the pack, and 16-byte
// aligned data. Otherwise the same kernels run with one value per access. Each thread keeps
// kUnroll packs (of x, and dy) in flight before it does the math.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "fastopt/bn_relu_host.h"
#include "fastopt/bn_relu_math.h"
#include "vec.cuh"

namespace fastopt {
namespace cuda {
namespace {

using bn::Shape;
constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // packs in flight per thread

template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename S>
constexpr int kPack = 16 / static_cast<int>(sizeof(S));  // values per 16-byte access

// channels_last blocks: lanes along the channels, 128 bytes of a row per block row; the block
// covers kClChannels<S> channels whatever the pack width.
template <typename S, int kV>
constexpr int kClLanes = 128 / (static_cast<int>(sizeof(S)) * kV);
template <typename S>
constexpr int kClChannels = 128 / static_cast<int>(sizeof(S));

// Note [32-bit division]: the NCS kernels find a pack's sample (or channel) by an integer
// division; in 32 bits when the tensor has fewer than 2^32 values (I = uint32_t, far cheaper on
// the GPU), in 64 bits otherwise. Offsets are always formed in 64 bits.
template <typename Fn>
void with_index_type(int64_t values, Fn&& fn) {
  if (values < (int64_t{1} << 32)) {
    fn(uint32_t{});
  } else {
    fn(uint64_t{});
  }
}

// What the reduction kernels read and write besides x and dy.
template <typename T>
struct SumsArgs {
  Shape sh;
  int splits;
  T* part;           // [2][splits][c]: the blocks' partial sums
  int32_t* counter;  // one per channel block, zero at launch (Note [last block finalizes])
  const T* weight;
  const T* bias;
  bool training;  // backward: whether the forward used the batch statistics
  // forward: written by the finalizer; backward: mean and invstd are read
  T* mean;
  T* invstd;
  T* running_mean;
  T* running_var;
  double momentum, eps;
  T* vec;  // forward: [scale, shift]; backward: [scale, shift, mean]
  // backward only
  T* dweight;
  T* dbias;
  T* coef;  // [k_g, k_c, k_0]
};

// Per-channel values a reduction pass needs: the shift k (Note [shifted sums]: the channel's
// first value forward, the mean backward), and backward the scale and shift of the ReLU mask.
template <typename T>
struct ChannelTerms {
  T k, scale, shift;
};

template <typename S, bool kGrad, typename T = acc_t<S>>
__device__ __forceinline__ ChannelTerms<T> channel_terms(const SumsArgs<T>& a, const S* __restrict__ x, int64_t c) {
  if constexpr (kGrad) {
    const bn::Affine<T> af = bn::affine<T>(static_cast<double>(a.mean[c]), static_cast<double>(a.invstd[c]),
                                           a.weight, a.bias, c);
    return {a.mean[c], af.scale, af.shift};
  } else {
    const T k = a.sh.count() > 0 ? static_cast<T>(x[a.sh.channels_last ? c : c * a.sh.s]) : T(0);
    return {k, T(0), T(0)};
  }
}

// The per-value terms: (x - k, (x - k)^2) forward, (g, g * (x - mean)) backward.
template <bool kGrad, typename T>
__device__ __forceinline__ void add_terms(T xv, T dyv, const ChannelTerms<T>& ct, T& a, T& b) {
  if constexpr (kGrad) {
    const T g = fma(xv, ct.scale, ct.shift) > T(0) ? dyv : T(0);
    a += g;
    b += g * (xv - ct.k);
  } else {
    const T d = xv - ct.k;
    a += d;
    b += d * d;
  }
}

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

// Note [last block finalizes]: every block stores its partials, fences, and bumps its channel
// block's counter; the block that sees splits - 1 is the last, and after a fence it reads every
// block's partials (through L2: __ldcg) and finalizes. The counters are zeroed per call with a
// memset (not reset by the kernel and cached: two calls on different streams may run at once).
// The partials are combined in a fixed order, so results do not depend on which block is last.
__device__ bool arrive_last(int32_t* counter, int splits) {
  __shared__ bool last;
  __threadfence();  // this thread's partials before the counter
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == splits - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// The finalizer's work for channel c from its combined sums s1, s2.
template <typename S, bool kGrad, typename T = acc_t<S>>
__device__ void finalize_channel(const SumsArgs<T>& a, const S* __restrict__ x, int64_t c, double s1, double s2) {
  const int64_t count = a.sh.count(), C = a.sh.c;
  if constexpr (kGrad) {
    const double invstd = static_cast<double>(a.invstd[c]);
    const ChannelTerms<T> ct = channel_terms<S, true>(a, x, c);
    a.dweight[c] = static_cast<T>(s2 * invstd);
    a.dbias[c] = static_cast<T>(s1);
    const bn::InputGrad<T> ig = bn::input_grad<T>(ct.scale, invstd, s1, s2, count, a.training);
    a.vec[c] = ct.scale;
    a.vec[C + c] = ct.shift;
    a.vec[2 * C + c] = ct.k;
    a.coef[c] = ig.k_g;
    a.coef[C + c] = ig.k_c;
    a.coef[2 * C + c] = ig.k_0;
  } else {
    const bn::Moments mo = bn::moments(static_cast<double>(channel_terms<S, false>(a, x, c).k), s1, s2, count);
    if (a.running_mean) a.running_mean[c] = static_cast<T>(bn::running_update(a.running_mean[c], mo.mean, a.momentum));
    if (a.running_var) {
      a.running_var[c] = static_cast<T>(bn::running_update(a.running_var[c], bn::unbiased(mo.var, count), a.momentum));
    }
    const T mean = static_cast<T>(mo.mean), invstd = static_cast<T>(1.0 / sqrt(mo.var + a.eps));
    a.mean[c] = mean;
    a.invstd[c] = invstd;
    const bn::Affine<T> af = bn::affine<T>(static_cast<double>(mean), static_cast<double>(invstd), a.weight, a.bias, c);
    a.vec[c] = af.scale;
    a.vec[C + c] = af.shift;
  }
}

// Reduction pass, NCS layout: block (channel, split) sums its slice of the channel's packs
// (kV values each; kV > 1 needs S % kV == 0, so a pack never crosses a row).
template <typename S, bool kGrad, int kV, typename I>
__global__ void __launch_bounds__(kThreads)
    sums_ncs_kernel(const S* __restrict__ x, const S* __restrict__ dy, SumsArgs<acc_t<S>> a) {
  using T = acc_t<S>;
  __shared__ T smem[kThreads / 32];
  __shared__ double smem64[kThreads / 32];
  const Shape sh = a.sh;
  const int64_t c = blockIdx.x, row_packs = sh.s / kV, packs = sh.count() / kV;
  const int64_t p0 = packs * blockIdx.y / a.splits, p1 = packs * (blockIdx.y + 1) / a.splits;
  const ChannelTerms<T> ct = channel_terms<S, kGrad>(a, x, c);
  T sa = 0, sb = 0;
  for (int64_t base = p0 + threadIdx.x; base < p1; base += kThreads * kUnroll) {
    Vec<S, kV> xs[kUnroll], ds[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + u * kThreads;
      if (p < p1) {
        const int64_t n = static_cast<int64_t>(static_cast<I>(p) / static_cast<I>(row_packs));
        const int64_t off = (n * sh.c + c) * sh.s + (p - n * row_packs) * kV;
        xs[u] = load_vec<kV>(x + off);
        if constexpr (kGrad) ds[u] = load_vec<kV>(dy + off);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * kThreads < p1) {
#pragma unroll
        for (int k = 0; k < kV; ++k) {
          add_terms<kGrad>(static_cast<T>(xs[u].v[k]), kGrad ? static_cast<T>(ds[u].v[k]) : T(0), ct, sa, sb);
        }
      }
    }
  }
  sa = block_sum(sa, smem);
  sb = block_sum(sb, smem);
  if (threadIdx.x == 0) {
    a.part[blockIdx.y * sh.c + c] = sa;
    a.part[(a.splits + blockIdx.y) * sh.c + c] = sb;
  }
  if (!arrive_last(a.counter + blockIdx.x, a.splits)) return;
  double s1 = 0.0, s2 = 0.0;
  for (int i = threadIdx.x; i < a.splits; i += kThreads) {
    s1 += static_cast<double>(__ldcg(a.part + i * sh.c + c));
    s2 += static_cast<double>(__ldcg(a.part + (a.splits + i) * sh.c + c));
  }
  s1 = block_sum(s1, smem64);
  s2 = block_sum(s2, smem64);
  if (threadIdx.x == 0) finalize_channel<S, kGrad>(a, x, c, s1, s2);
}

// Reduction pass, channels_last: block (kClChannels<S> channels, split of the rows); thread
// (lane, row) owns kV consecutive channels of every kRows-th row, so a block row reads 128
// contiguous bytes; the rows' partials are summed in order.
template <typename S, bool kGrad, int kV>
__global__ void __launch_bounds__(kThreads)
    sums_cl_kernel(const S* __restrict__ x, const S* __restrict__ dy, SumsArgs<acc_t<S>> a) {
  using T = acc_t<S>;
  constexpr int kLanes = kClLanes<S, kV>, kRows = kThreads / kLanes, kChannels = kClChannels<S>;
  __shared__ T sa[kRows][kChannels], sb[kRows][kChannels];
  const Shape sh = a.sh;
  const int lane = threadIdx.x % kLanes, row = threadIdx.x / kLanes;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kChannels + lane * kV, rows = sh.count();
  const int64_t r0 = rows * blockIdx.y / a.splits, r1 = rows * (blockIdx.y + 1) / a.splits;
  const bool active = c0 < sh.c;  // kV > 1: C % kV == 0, so the whole pack is in range
  ChannelTerms<T> ct[kV];
  T acc_a[kV], acc_b[kV];
#pragma unroll
  for (int k = 0; k < kV; ++k) {
    ct[k] = active ? channel_terms<S, kGrad>(a, x, c0 + k) : ChannelTerms<T>{T(0), T(0), T(0)};
    acc_a[k] = acc_b[k] = T(0);
  }
  if (active) {
    for (int64_t base = r0 + row; base < r1; base += kRows * kUnroll) {
      Vec<S, kV> xs[kUnroll], ds[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t r = base + u * kRows;
        if (r < r1) {
          xs[u] = load_vec<kV>(x + r * sh.c + c0);
          if constexpr (kGrad) ds[u] = load_vec<kV>(dy + r * sh.c + c0);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kRows < r1) {
#pragma unroll
          for (int k = 0; k < kV; ++k) {
            add_terms<kGrad>(static_cast<T>(xs[u].v[k]), kGrad ? static_cast<T>(ds[u].v[k]) : T(0), ct[k], acc_a[k],
                             acc_b[k]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kV; ++k) {
    sa[row][lane * kV + k] = acc_a[k];
    sb[row][lane * kV + k] = acc_b[k];
  }
  __syncthreads();
  // thread t < kChannels sums channel (block's) t over the rows, in order, and stores the partial
  const int64_t ct_c = static_cast<int64_t>(blockIdx.x) * kChannels + threadIdx.x;
  if (threadIdx.x < kChannels && ct_c < sh.c) {
    T pa = T(0), pb = T(0);
    for (int r = 0; r < kRows; ++r) {
      pa += sa[r][threadIdx.x];
      pb += sb[r][threadIdx.x];
    }
    a.part[blockIdx.y * sh.c + ct_c] = pa;
    a.part[(a.splits + blockIdx.y) * sh.c + ct_c] = pb;
  }
  if (!arrive_last(a.counter + blockIdx.x, a.splits)) return;
  // finalize: kThreads / kChannels threads per channel, each over every kGroups-th split, then in order
  constexpr int kGroups = kThreads / kChannels;
  __shared__ double f1[kGroups][kChannels], f2[kGroups][kChannels];
  const int ch = threadIdx.x % kChannels, group = threadIdx.x / kChannels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannels + ch;
  double s1 = 0.0, s2 = 0.0;
  if (c < sh.c) {
    for (int i = group; i < a.splits; i += kGroups) {
      s1 += static_cast<double>(__ldcg(a.part + i * sh.c + c));
      s2 += static_cast<double>(__ldcg(a.part + (a.splits + i) * sh.c + c));
    }
  }
  f1[group][ch] = s1;
  f2[group][ch] = s2;
  __syncthreads();
  if (group == 0 && c < sh.c) {
    for (int g = 1; g < kGroups; ++g) {
      s1 += f1[g][ch];
      s2 += f2[g][ch];
    }
    finalize_channel<S, kGrad>(a, x, c, s1, s2);
  }
}

// Eval forward, one thread per channel: mean and invstd from the running statistics, then
// scale and shift for the elementwise pass.
template <typename T>
__global__ void eval_affine_kernel(int64_t channels, const T* running_mean, const T* running_var, double eps,
                                   const T* weight, const T* bias, T* mean, T* invstd, T* vec) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  mean[c] = running_mean[c];
  invstd[c] = static_cast<T>(1.0 / sqrt(static_cast<double>(running_var[c]) + eps));
  const bn::Affine<T> af = bn::affine<T>(static_cast<double>(mean[c]), static_cast<double>(invstd[c]), weight, bias, c);
  vec[c] = af.scale;
  vec[channels + c] = af.shift;
}

// Elementwise pass over the packs in reverse order (Note [second pass in reverse]).
// kGrad=false: y = max(fma(x, scale, shift), 0), NaN kept; true: dx = k_g * g + k_c * (x - mean) + k_0.
// vec: [scale, shift(, mean)], coef: [k_g, k_c, k_0], each c long.
//
// Note [second pass in reverse]: the reduction pass reads x (and dy) front to back; this pass
// walks back to front, so it starts on what the reduction read last, which is still in L2 when it
// fits (50 MB on an H100/H200: every ResNet-50 BN input at batch 32 in bf16).
template <typename S, bool kGrad, bool kCl, int kV, typename I>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const S* __restrict__ x, const S* __restrict__ dy, S* __restrict__ out, Shape sh,
                 const acc_t<S>* __restrict__ vec, const acc_t<S>* __restrict__ coef, int64_t packs) {
  using T = acc_t<S>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; base < packs;
       base += stride * kUnroll) {
    Vec<S, kV> xs[kUnroll], ds[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + u * stride;
      if (p < packs) {
        const int64_t i = (packs - 1 - p) * kV;
        xs[u] = load_vec<kV>(x + i);
        if constexpr (kGrad) ds[u] = load_vec<kV>(dy + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + u * stride;
      if (p >= packs) continue;
      const int64_t i = (packs - 1 - p) * kV;
      const auto ii = static_cast<I>(i);
      // kCl: channels c..c+kV-1 (C % kV == 0); NCS: one channel for the pack (S % kV == 0)
      const int64_t c = static_cast<int64_t>(kCl ? ii % static_cast<I>(sh.c)
                                                 : (ii / static_cast<I>(sh.s)) % static_cast<I>(sh.c));
      constexpr int kW = kCl ? kV : 1;
      const Vec<T, kW> scale = load_vec<kW>(vec + c), shift = load_vec<kW>(vec + sh.c + c);
      Vec<S, kV> o;
      if constexpr (kGrad) {
        const Vec<T, kW> mean = load_vec<kW>(vec + 2 * sh.c + c), kg = load_vec<kW>(coef + c),
                          kc = load_vec<kW>(coef + sh.c + c), k0 = load_vec<kW>(coef + 2 * sh.c + c);
#pragma unroll
        for (int k = 0; k < kV; ++k) {
          const int w = kCl ? k : 0;
          const T xv = static_cast<T>(xs[u].v[k]);
          const T g = fma(xv, scale.v[w], shift.v[w]) > T(0) ? static_cast<T>(ds[u].v[k]) : T(0);
          o.v[k] = static_cast<S>(kg.v[w] * g + kc.v[w] * (xv - mean.v[w]) + k0.v[w]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < kV; ++k) {
          const int w = kCl ? k : 0;
          const T z = fma(static_cast<T>(xs[u].v[k]), scale.v[w], shift.v[w]);
          o.v[k] = static_cast<S>(z > T(0) ? z : (z != z ? z : T(0)));
        }
      }
      *reinterpret_cast<Vec<S, kV>*>(out + i) = o;
    }
  }
}

// Blocks of `kernel` that fit on the current GPU at once (the occupancy API), at least one per
// SM. Cached per (kernel, device): the queries cost microseconds per call, as much as a 7x7
// layer's kernels.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return cache[key] = static_cast<int64_t>(std::max(per_sm, 1)) * sms;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Note [16-byte packs]: whether x (and dy, out) can be read in packs of kPack<S> values.
template <typename S>
bool packs_fit(const Shape& sh, std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return (sh.channels_last ? sh.c : sh.s) % kPack<S> == 0;
}

// The reduction pass, finalizer included: grid (channel blocks, splits), the splits chosen so
// the grid fills the GPU once, each split at least one unrolled step of every thread.
template <typename S, bool kGrad>
void channel_sums(const S* x, const S* dy, SumsArgs<acc_t<S>> a, const at::Tensor& like) {
  using T = acc_t<S>;
  const Shape& sh = a.sh;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t cblocks = sh.channels_last ? (sh.c + kClChannels<S> - 1) / kClChannels<S> : sh.c;
  TORCH_CHECK(cblocks <= std::numeric_limits<int>::max(), "fastopt::bn_relu: too many channels");
  const bool wide = packs_fit<S>(sh, {x, dy});
  auto launch = [&](auto kernel, int64_t per_split) {
    const int64_t target = (resident_blocks(kernel) + cblocks - 1) / cblocks;
    const int64_t most = std::max<int64_t>(1, sh.count() / per_split);
    a.splits = static_cast<int>(std::clamp<int64_t>(target, 1, std::min<int64_t>(most, 65535)));
    // one allocation: the partials, then the counters (zeroed)
    const int64_t part_bytes = (2 * a.splits * sh.c * static_cast<int64_t>(sizeof(T)) + 15) / 16 * 16;
    at::Tensor work = at::empty({part_bytes + cblocks * static_cast<int64_t>(sizeof(int32_t))},
                                like.options().dtype(at::kByte));
    a.part = reinterpret_cast<T*>(work.data_ptr<uint8_t>());
    a.counter = reinterpret_cast<int32_t*>(work.data_ptr<uint8_t>() + part_bytes);
    C10_CUDA_CHECK(cudaMemsetAsync(a.counter, 0, cblocks * sizeof(int32_t), stream));
    kernel<<<dim3(static_cast<unsigned>(cblocks), static_cast<unsigned>(a.splits)), kThreads, 0, stream>>>(x, dy, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // `work` is freed here: the caching allocator hands it out again only in this stream's order
  };
  if (sh.channels_last) {
    if (wide) {
      launch(sums_cl_kernel<S, kGrad, kPack<S>>, (kThreads / kClLanes<S, kPack<S>>) * kUnroll);
    } else {
      launch(sums_cl_kernel<S, kGrad, 1>, (kThreads / kClLanes<S, 1>) * kUnroll);
    }
  } else {
    with_index_type(sh.count(), [&](auto index) {
      using I = decltype(index);
      if (wide) {
        launch(sums_ncs_kernel<S, kGrad, kPack<S>, I>, int64_t{kThreads} * kUnroll * kPack<S>);
      } else {
        launch(sums_ncs_kernel<S, kGrad, 1, I>, int64_t{kThreads} * kUnroll);
      }
    });
  }
}

template <typename S, bool kGrad>
void elementwise(const S* x, const S* dy, S* out, const Shape& sh, const acc_t<S>* vec, const acc_t<S>* coef) {
  const int64_t total = sh.count() * sh.c;
  if (total == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool wide = packs_fit<S>(sh, {x, dy, out});
  auto launch = [&](auto kernel, int64_t kv) {
    const int64_t packs = total / kv, per_block = int64_t{kThreads} * kUnroll;
    const int64_t blocks = std::min<int64_t>((packs + per_block - 1) / per_block, resident_blocks(kernel));
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, dy, out, sh, vec, coef, packs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  with_index_type(total, [&](auto index) {
    using I = decltype(index);
    if (sh.channels_last) {
      wide ? launch(apply_kernel<S, kGrad, true, kPack<S>, I>, kPack<S>) : launch(apply_kernel<S, kGrad, true, 1, I>, 1);
    } else {
      wide ? launch(apply_kernel<S, kGrad, false, kPack<S>, I>, kPack<S>)
           : launch(apply_kernel<S, kGrad, false, 1, I>, 1);
    }
  });
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_forward_cuda", [&] {
    using S = scalar_t;
    using T = acc_t<S>;
    const S* xp = x.data_ptr<S>();
    if (training) {
      SumsArgs<T> a{};
      a.sh = sh;
      a.weight = bn::data_or_null<T>(weight);
      a.bias = bn::data_or_null<T>(bias);
      a.training = true;
      a.mean = mean.data_ptr<T>();
      a.invstd = invstd.data_ptr<T>();
      a.running_mean = bn::data_or_null<T>(running_mean);
      a.running_var = bn::data_or_null<T>(running_var);
      a.momentum = momentum;
      a.eps = eps;
      a.vec = vec.data_ptr<T>();
      channel_sums<S, false>(xp, nullptr, a, x);
    } else {
      eval_affine_kernel<T><<<static_cast<unsigned>((sh.c + kThreads - 1) / kThreads), kThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
          sh.c, bn::data_or_null<T>(running_mean), bn::data_or_null<T>(running_var), eps, bn::data_or_null<T>(weight),
          bn::data_or_null<T>(bias), mean.data_ptr<T>(), invstd.data_ptr<T>(), vec.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    elementwise<S, false>(xp, nullptr, y.data_ptr<S>(), sh, vec.data_ptr<T>(), nullptr);
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
  // [scale, shift, mean] and [k_g, k_c, k_0] per channel, written by the reduction's finalizer
  at::Tensor vec = at::empty({6 * sh.c}, stat_opts);
  if (sh.c == 0) return {dx, dweight, dbias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_cuda", [&] {
    using S = scalar_t;
    using T = acc_t<S>;
    SumsArgs<T> a{};
    a.sh = sh;
    a.weight = bn::data_or_null<T>(weight);
    a.bias = bn::data_or_null<T>(bias);
    a.training = training;
    a.mean = const_cast<T*>(mean.data_ptr<T>());  // read only in the backward kernels
    a.invstd = const_cast<T*>(invstd.data_ptr<T>());
    a.vec = vec.data_ptr<T>();
    a.coef = vec.data_ptr<T>() + 3 * sh.c;
    a.dweight = dweight.data_ptr<T>();
    a.dbias = dbias.data_ptr<T>();
    channel_sums<S, true>(x.data_ptr<S>(), dy.data_ptr<S>(), a, x);
    if (need_input_grad) {
      elementwise<S, true>(x.data_ptr<S>(), dy.data_ptr<S>(), dx.data_ptr<S>(), sh, a.vec, a.coef);
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
