// fastopt::bn_relu_forward / bn_relu_backward on CPU: BatchNorm followed by ReLU in two passes
// over x forward (statistics, then normalize+ReLU) and two backward (sums, then dx).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "fastopt/bn_relu_host.h"
#include "fastopt/bn_relu_math.h"

namespace fastopt {
namespace cpu {
namespace {

using bn::Shape;
constexpr int64_t kBlockRows = 64;      // channels_last: rows summed in the accumulation dtype
constexpr int64_t kGrainElems = 32768;  // elements per task of the elementwise passes

// Note [row lanes]: the rows of one channel of an NCHW tensor (one per sample) are summed into
// kLanes independent float lanes (a vector register), flushed to double lanes every
// kFlushValues values: no horizontal reduction per row, which costs more than the row itself when
// rows are short (7x7 feature maps). The lanes are reduced once per channel at the end.
constexpr int kLanes = 16;

constexpr int64_t kFlushValues = 4096;  // at most this many values per float lane set

// kLanes values of T in one vector-typed variable (GCC/Clang vector extension), so the lanes
// live in registers across a row rather than in a stack array reloaded every step.
template <typename T>
struct LaneType;
template <>
struct LaneType<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct LaneType<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};
template <typename T>
using LaneVec = typename LaneType<T>::type;

// Adds the terms (a, b) = term(i) of values i < len of one row to the lanes.
template <typename T, typename Term>
inline void row_into_lanes(int64_t len, const Term& term, LaneVec<T>& la, LaneVec<T>& lb) {
  for (int64_t i = 0; i < len; i += kLanes) {
    T ta[kLanes], tb[kLanes];
    const int n = static_cast<int>(std::min<int64_t>(kLanes, len - i));
    if (n == kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) term(i + j, ta[j], tb[j]);
    } else {  // the row's last values: masked (AVX-512 masked loads), lanes j >= n add zero
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        T u = 0, v = 0;
        if (j < n) term(i + j, u, v);
        ta[j] = u;
        tb[j] = v;
      }
    }
    LaneVec<T> va, vb;  // never indexed by a variable: la and lb stay in registers
    std::memcpy(&va, ta, sizeof(va));
    std::memcpy(&vb, tb, sizeof(vb));
    la += va;
    lb += vb;
  }
}

template <typename T>
inline void flush_lanes(LaneVec<T>& la, LaneVec<T>& lb, double* __restrict__ da, double* __restrict__ db) {
  for (int j = 0; j < kLanes; ++j) {
    da[j] += la[j];
    db[j] += lb[j];
  }
  la = LaneVec<T>{};
  lb = LaneVec<T>{};
}

// Per-channel sums over every value of the channel, Note [shifted sums]: for each channel c,
// out_a[c] and out_b[c] are the sums of the two terms `term` computes per value. NCHW: threads
// split the channels, each channel's rows go through float lanes (Note [row lanes]);
// channels_last: threads split the rows, summed per channel in float over blocks of kBlockRows
// rows, then in double. The order is fixed by the shape and thread count, so results are
// reproducible.
template <typename T, typename Term>
void channel_sums(const Shape& sh, Term&& term, std::vector<double>& out_a, std::vector<double>& out_b) {
  out_a.assign(sh.c, 0.0);
  out_b.assign(sh.c, 0.0);
  if (sh.count() == 0) return;
  if (!sh.channels_last) {
    // One channel at a time: its rows (one per sample) go into kLanes float lanes, which are
    // added to double lanes whenever they hold kFlushValues values and at the channel's end
    // (Note [row lanes]).
    at::parallel_for(0, sh.c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double da[kLanes] = {}, db[kLanes] = {};
        LaneVec<T> la{}, lb{};
        int64_t held = 0;
        for (int64_t n = 0; n < sh.n; ++n) {
          term.row_ncs(n, c, la, lb);
          held += sh.s;
          if (held >= kFlushValues || n + 1 == sh.n) {
            flush_lanes<T>(la, lb, da, db);
            held = 0;
          }
        }
        double a = 0.0, b = 0.0;
        for (int j = 0; j < kLanes; ++j) {
          a += da[j];
          b += db[j];
        }
        out_a[c] = a;
        out_b[c] = b;
      }
    });
    return;
  }
  const int64_t rows = sh.count(), blocks = (rows + kBlockRows - 1) / kBlockRows;
  const int64_t chunks = std::min<int64_t>(blocks, 4 * at::get_num_threads());
  std::vector<double> part(static_cast<size_t>(chunks * 2 * sh.c), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> fa(sh.c), fb(sh.c);
    for (int64_t k = k0; k < k1; ++k) {
      double* pa = part.data() + k * 2 * sh.c;
      double* pb = pa + sh.c;
      const int64_t b0 = blocks * k / chunks, b1 = blocks * (k + 1) / chunks;
      for (int64_t blk = b0; blk < b1; ++blk) {
        std::fill(fa.begin(), fa.end(), T(0));
        std::fill(fb.begin(), fb.end(), T(0));
        const int64_t r1 = std::min(rows, (blk + 1) * kBlockRows);
        for (int64_t r = blk * kBlockRows; r < r1; ++r) term.row_cl(r, fa.data(), fb.data());
        for (int64_t c = 0; c < sh.c; ++c) {
          pa[c] += fa[c];
          pb[c] += fb[c];
        }
      }
    }
  });
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < sh.c; ++c) {
      out_a[c] += part[k * 2 * sh.c + c];
      out_b[c] += part[k * 2 * sh.c + sh.c + c];
    }
  }
}

// sum(x - k) and sum((x - k)^2), k[c] the channel's first value.
template <typename S, typename T>
struct MomentTerm {
  const S* x;
  const T* k;
  const Shape& sh;
  void row_ncs(int64_t n, int64_t c, LaneVec<T>& la, LaneVec<T>& lb) const {
    const S* __restrict__ row = x + (n * sh.c + c) * sh.s;
    const T kc = k[c];
    row_into_lanes<T>(sh.s, [&](int64_t i, T& a, T& b) {
      const T d = static_cast<T>(row[i]) - kc;
      a = d;
      b = d * d;
    }, la, lb);
  }
  void row_cl(int64_t r, T* __restrict__ fa, T* __restrict__ fb) const {
    const S* __restrict__ row = x + r * sh.c;
#pragma omp simd
    for (int64_t c = 0; c < sh.c; ++c) {
      const T d = static_cast<T>(row[c]) - k[c];
      fa[c] += d;
      fb[c] += d * d;
    }
  }
};

// sum(g) and sum(g * (x - mean)), g = dy where z = fma(x, scale, shift) > 0, else 0.
template <typename S, typename T>
struct GradTerm {
  const S* x;
  const S* dy;
  const T* mean;
  const T* scale;
  const T* shift;
  const Shape& sh;
  void row_ncs(int64_t n, int64_t c, LaneVec<T>& la, LaneVec<T>& lb) const {
    const int64_t off = (n * sh.c + c) * sh.s;
    const S* __restrict__ xr = x + off;
    const S* __restrict__ gr = dy + off;
    const T m = mean[c], sc = scale[c], sf = shift[c];
    row_into_lanes<T>(sh.s, [&](int64_t i, T& a, T& b) {
      const T xi = static_cast<T>(xr[i]);
      const T g = std::fma(xi, sc, sf) > T(0) ? static_cast<T>(gr[i]) : T(0);
      a = g;
      b = g * (xi - m);
    }, la, lb);
  }
  void row_cl(int64_t r, T* __restrict__ fa, T* __restrict__ fb) const {
    const S* __restrict__ xr = x + r * sh.c;
    const S* __restrict__ gr = dy + r * sh.c;
#pragma omp simd
    for (int64_t c = 0; c < sh.c; ++c) {
      const T xi = static_cast<T>(xr[c]);
      const T g = std::fma(xi, scale[c], shift[c]) > T(0) ? static_cast<T>(gr[c]) : T(0);
      fa[c] += g;
      fb[c] += g * (xi - mean[c]);
    }
  }
};

// Elementwise pass over every (row, channel) value: fn(x_index, c_vectors...) through `rows`.
// NCS: one task unit is one (n, c) row of s values with per-row scalars; channels_last: one row
// of c values with per-channel vectors.
template <typename RowNcs, typename RowCl>
void for_each_row(const Shape& sh, RowNcs&& ncs, RowCl&& cl) {
  if (sh.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(sh.c, 1));
    at::parallel_for(0, sh.count(), grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) cl(r);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(sh.s, 1));
    at::parallel_for(0, sh.n * sh.c, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) ncs(r, r % sh.c);
    });
  }
}

template <typename T>
struct ChannelAffine {
  std::vector<T> scale, shift;
};

template <typename T>
ChannelAffine<T> channel_affine(const Shape& sh, const T* mean, const T* invstd, const T* w, const T* b) {
  ChannelAffine<T> a{std::vector<T>(sh.c), std::vector<T>(sh.c)};
  for (int64_t c = 0; c < sh.c; ++c) {
    const auto af = bn::affine<T>(mean[c], invstd[c], w, b, c);
    a.scale[c] = af.scale;
    a.shift[c] = af.shift;
  }
  return a;
}

template <typename S>
void forward_kernel(const at::Tensor& x, const Shape& sh, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
                    at::Tensor& y, at::Tensor& mean, at::Tensor& invstd) {
  using T = at::opmath_type<S>;
  const S* xp = x.data_ptr<S>();
  T* mp = mean.data_ptr<T>();
  T* ip = invstd.data_ptr<T>();
  if (training) {
    std::vector<T> k(sh.c, T(0));
    for (int64_t c = 0; c < sh.c && sh.count() > 0; ++c) k[c] = static_cast<T>(xp[sh.channels_last ? c : c * sh.s]);
    std::vector<double> s1, s2;
    channel_sums<T>(sh, MomentTerm<S, T>{xp, k.data(), sh}, s1, s2);
    T* rm = bn::data_or_null<T>(running_mean);
    T* rv = bn::data_or_null<T>(running_var);
    for (int64_t c = 0; c < sh.c; ++c) {
      const bn::Moments mo = bn::moments(k[c], s1[c], s2[c], sh.count());
      mp[c] = static_cast<T>(mo.mean);
      ip[c] = static_cast<T>(1.0 / std::sqrt(mo.var + eps));
      if (rm) rm[c] = static_cast<T>(bn::running_update(rm[c], mo.mean, momentum));
      if (rv) rv[c] = static_cast<T>(bn::running_update(rv[c], bn::unbiased(mo.var, sh.count()), momentum));
    }
  } else {
    const T* rm = running_mean->data_ptr<T>();
    const T* rv = running_var->data_ptr<T>();
    for (int64_t c = 0; c < sh.c; ++c) {
      mp[c] = rm[c];
      ip[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
    }
  }
  const auto af = channel_affine<T>(sh, mp, ip, bn::data_or_null<T>(weight), bn::data_or_null<T>(bias));
  const T* sc = af.scale.data();
  const T* sf = af.shift.data();
  S* yp = y.data_ptr<S>();
  for_each_row(
      sh,
      [&](int64_t r, int64_t c) {
        const S* __restrict__ xr = xp + r * sh.s;
        S* __restrict__ yr = yp + r * sh.s;
        const T a = sc[c], b = sf[c];
#pragma omp simd
        for (int64_t i = 0; i < sh.s; ++i) yr[i] = static_cast<S>(std::max(std::fma(static_cast<T>(xr[i]), a, b), T(0)));
      },
      [&](int64_t r) {
        const S* __restrict__ xr = xp + r * sh.c;
        S* __restrict__ yr = yp + r * sh.c;
#pragma omp simd
        for (int64_t c = 0; c < sh.c; ++c) yr[c] = static_cast<S>(std::max(std::fma(static_cast<T>(xr[c]), sc[c], sf[c]), T(0)));
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps) {
  constexpr const char* op = "fastopt::bn_relu_forward";
  const Shape sh = bn::check_forward(op, x, weight, bias, running_mean, running_var, training);
  const auto stat_opts = x.options().dtype(bn::stat_type(x));
  at::Tensor mean = at::empty({sh.c}, stat_opts), invstd = at::empty({sh.c}, stat_opts);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_forward", [&] {
    forward_kernel<scalar_t>(x, sh, weight, bias, running_mean, running_var, training, momentum, eps, y, mean, invstd);
  });
  return {y, mean, invstd};
}

template <typename S>
void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const Shape& sh, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
                     bool training, at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias) {
  using T = at::opmath_type<S>;
  const S* xp = x.data_ptr<S>();
  const S* gp = dy.data_ptr<S>();
  const T* mp = mean.data_ptr<T>();
  const T* ip = invstd.data_ptr<T>();
  const auto af = channel_affine<T>(sh, mp, ip, bn::data_or_null<T>(weight), bn::data_or_null<T>(bias));
  const T* sc = af.scale.data();
  const T* sf = af.shift.data();
  std::vector<double> sum_g, sum_gc;
  channel_sums<T>(sh, GradTerm<S, T>{xp, gp, mp, sc, sf, sh}, sum_g, sum_gc);
  T* dw = dweight.data_ptr<T>();
  T* db = dbias.data_ptr<T>();
  std::vector<T> kg(sh.c), kc(sh.c), k0(sh.c);
  for (int64_t c = 0; c < sh.c; ++c) {
    dw[c] = static_cast<T>(sum_gc[c] * static_cast<double>(ip[c]));
    db[c] = static_cast<T>(sum_g[c]);
    const auto ig = bn::input_grad<T>(sc[c], ip[c], sum_g[c], sum_gc[c], sh.count(), training);
    kg[c] = ig.k_g;
    kc[c] = ig.k_c;
    k0[c] = ig.k_0;
  }
  if (!dx.numel()) return;
  S* dxp = dx.data_ptr<S>();
  for_each_row(
      sh,
      [&](int64_t r, int64_t c) {
        const int64_t off = r * sh.s;
        const S* __restrict__ xr = xp + off;
        const S* __restrict__ gr = gp + off;
        S* __restrict__ out = dxp + off;
        const T a = sc[c], b = sf[c], m = mp[c], ag = kg[c], ac = kc[c], a0 = k0[c];
#pragma omp simd
        for (int64_t i = 0; i < sh.s; ++i) {
          const T xi = static_cast<T>(xr[i]);
          const T g = std::fma(xi, a, b) > T(0) ? static_cast<T>(gr[i]) : T(0);
          out[i] = static_cast<S>(ag * g + ac * (xi - m) + a0);
        }
      },
      [&](int64_t r) {
        const S* __restrict__ xr = xp + r * sh.c;
        const S* __restrict__ gr = gp + r * sh.c;
        S* __restrict__ out = dxp + r * sh.c;
#pragma omp simd
        for (int64_t c = 0; c < sh.c; ++c) {
          const T xi = static_cast<T>(xr[c]);
          const T g = std::fma(xi, sc[c], sf[c]) > T(0) ? static_cast<T>(gr[c]) : T(0);
          out[c] = static_cast<S>(kg[c] * g + kc[c] * (xi - mp[c]) + k0[c]);
        }
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    bool need_input_grad) {
  constexpr const char* op = "fastopt::bn_relu_backward";
  const Shape sh = bn::check_backward(op, dy, x, weight, bias, mean, invstd);
  const auto stat_opts = x.options().dtype(bn::stat_type(x));
  at::Tensor dweight = at::empty({sh.c}, stat_opts), dbias = at::empty({sh.c}, stat_opts);
  at::Tensor dx = need_input_grad ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward", [&] {
    backward_kernel<scalar_t>(dy, x, sh, weight, bias, mean, invstd, training, dx, dweight, dbias);
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("bn_relu_forward", &bn_relu_forward);
  m.impl("bn_relu_backward", &bn_relu_backward);
}

}  // namespace cpu
}  // namespace fastopt
