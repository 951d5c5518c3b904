// BatchNorm+ReLU on the CPU, the passes over the data: per-channel sums (the statistics forward,
// the gradient sums backward) and the elementwise passes (y forward, dx backward). The per-channel
// arithmetic between them is csrc/cpu/batch_norm_relu.cpp's. Compiled once per CPU capability
// (Note [capability kernels], ../kernels.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "common.h"

namespace fastopt {
namespace cpu {
namespace FASTOPT_CPU_CAPABILITY {

namespace {

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
// channels_last: the rows are split into at most bn_max_chunks(threads) chunks, each summed per
// channel in float over blocks of kBlockRows rows, then in double; the chunks are added in order.
// The order is fixed by the shape and thread count, so results are reproducible.
template <typename T, typename Term>
void channel_sums(const BnArgs& b, const Term& term) {
  const BnShape& sh = b.shape;
  double* out_a = b.sum_a;
  double* out_b = b.sum_b;
  std::fill(out_a, out_a + sh.c, 0.0);
  std::fill(out_b, out_b + sh.c, 0.0);
  const int64_t rows_per_channel = sh.n * sh.s;
  if (rows_per_channel == 0) return;
  if (!sh.channels_last) {
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
        double a = 0.0, s2 = 0.0;
        for (int j = 0; j < kLanes; ++j) {
          a += da[j];
          s2 += db[j];
        }
        out_a[c] = a;
        out_b[c] = s2;
      }
    });
    return;
  }
  const int64_t rows = rows_per_channel, blocks = (rows + kBlockRows - 1) / kBlockRows;
  const int64_t chunks = std::min<int64_t>(blocks, bn_max_chunks(b.threads));
  double* part = b.scratch;                       // chunks * 2 * c partial sums
  double* acc = b.scratch + chunks * 2 * sh.c;    // chunks * 2 * c doubles of room: 2 * c T each
  std::fill(part, part + chunks * 2 * sh.c, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double* pa = part + k * 2 * sh.c;
      double* pb = pa + sh.c;
      T* fa = reinterpret_cast<T*>(acc + k * 2 * sh.c);
      T* fb = fa + sh.c;
      const int64_t b0 = blocks * k / chunks, b1 = blocks * (k + 1) / chunks;
      for (int64_t blk = b0; blk < b1; ++blk) {
        std::fill(fa, fa + sh.c, T(0));
        std::fill(fb, fb + sh.c, T(0));
        const int64_t r1 = std::min(rows, (blk + 1) * kBlockRows);
        for (int64_t r = blk * kBlockRows; r < r1; ++r) term.row_cl(r, fa, fb);
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
  const BnShape& sh;
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

// z = x * scale + shift, with one rounding where the CPU has FMA (madd, fastopt/update_math.h):
// the same function forward and backward, so that the backward's recomputed ReLU mask is the
// forward's bit for bit.
template <typename T>
inline T affine_z(T x, T scale, T shift) {
  return madd(x, scale, shift);
}

// sum(g) and sum(g * (x - mean)), g = dy where z > 0, else 0.
template <typename S, typename T>
struct GradTerm {
  const S* x;
  const S* dy;
  const T* mean;
  const T* scale;
  const T* shift;
  const BnShape& sh;
  void row_ncs(int64_t n, int64_t c, LaneVec<T>& la, LaneVec<T>& lb) const {
    const int64_t off = (n * sh.c + c) * sh.s;
    const S* __restrict__ xr = x + off;
    const S* __restrict__ gr = dy + off;
    const T m = mean[c], sc = scale[c], sf = shift[c];
    row_into_lanes<T>(sh.s, [&](int64_t i, T& a, T& b) {
      const T xi = static_cast<T>(xr[i]);
      const T g = affine_z(xi, sc, sf) > T(0) ? static_cast<T>(gr[i]) : T(0);
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
      const T g = affine_z(xi, scale[c], shift[c]) > T(0) ? static_cast<T>(gr[c]) : T(0);
      fa[c] += g;
      fb[c] += g * (xi - mean[c]);
    }
  }
};

// An elementwise pass over every (row, channel) value. NCS: one task unit is one (n, c) row of s
// values with per-row scalars; channels_last: one row of c values with per-channel vectors.
template <typename RowNcs, typename RowCl>
void for_each_row(const BnShape& sh, const RowNcs& ncs, const RowCl& cl) {
  if (sh.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(sh.c, 1));
    at::parallel_for(0, sh.n * sh.s, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) cl(r);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(sh.s, 1));
    at::parallel_for(0, sh.n * sh.c, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) ncs(r, r % sh.c);
    });
  }
}

template <typename Fn>
void with_types(const BnArgs& b, Fn&& fn) {
  with_dtype(b.dtype, [&](auto s) { fn(s, typename Compute<decltype(s)>::type{}); });
}

}  // namespace

void bn_moment_sums(const BnArgs& b) {
  with_types(b, [&](auto s, auto t) {
    using S = decltype(s);
    using T = decltype(t);
    channel_sums<T>(b, MomentTerm<S, T>{static_cast<const S*>(b.x), static_cast<const T*>(b.k), b.shape});
  });
}

void bn_apply(const BnArgs& b) {
  with_types(b, [&](auto s, auto t) {
    using S = decltype(s);
    using T = decltype(t);
    const BnShape& sh = b.shape;
    const S* xp = static_cast<const S*>(b.x);
    S* yp = static_cast<S*>(b.out);
    const T* sc = static_cast<const T*>(b.scale);
    const T* sf = static_cast<const T*>(b.shift);
    for_each_row(
        sh,
        [&](int64_t r, int64_t c) {
          const S* __restrict__ xr = xp + r * sh.s;
          S* __restrict__ yr = yp + r * sh.s;
          const T a = sc[c], z0 = sf[c];
#pragma omp simd
          for (int64_t i = 0; i < sh.s; ++i) yr[i] = static_cast<S>(std::max(affine_z(static_cast<T>(xr[i]), a, z0), T(0)));
        },
        [&](int64_t r) {
          const S* __restrict__ xr = xp + r * sh.c;
          S* __restrict__ yr = yp + r * sh.c;
#pragma omp simd
          for (int64_t c = 0; c < sh.c; ++c) {
            yr[c] = static_cast<S>(std::max(affine_z(static_cast<T>(xr[c]), sc[c], sf[c]), T(0)));
          }
        });
  });
}

void bn_grad_sums(const BnArgs& b) {
  with_types(b, [&](auto s, auto t) {
    using S = decltype(s);
    using T = decltype(t);
    channel_sums<T>(b, GradTerm<S, T>{static_cast<const S*>(b.x), static_cast<const S*>(b.dy),
                                      static_cast<const T*>(b.mean), static_cast<const T*>(b.scale),
                                      static_cast<const T*>(b.shift), b.shape});
  });
}

void bn_input_grad(const BnArgs& b) {
  with_types(b, [&](auto s, auto t) {
    using S = decltype(s);
    using T = decltype(t);
    const BnShape& sh = b.shape;
    const S* xp = static_cast<const S*>(b.x);
    const S* gp = static_cast<const S*>(b.dy);
    S* dxp = static_cast<S*>(b.out);
    const T *sc = static_cast<const T*>(b.scale), *sf = static_cast<const T*>(b.shift);
    const T *mp = static_cast<const T*>(b.mean), *kg = static_cast<const T*>(b.k_g);
    const T *kc = static_cast<const T*>(b.k_c), *k0 = static_cast<const T*>(b.k_0);
    for_each_row(
        sh,
        [&](int64_t r, int64_t c) {
          const int64_t off = r * sh.s;
          const S* __restrict__ xr = xp + off;
          const S* __restrict__ gr = gp + off;
          S* __restrict__ out = dxp + off;
          const T a = sc[c], z0 = sf[c], m = mp[c], ag = kg[c], ac = kc[c], a0 = k0[c];
#pragma omp simd
          for (int64_t i = 0; i < sh.s; ++i) {
            const T xi = static_cast<T>(xr[i]);
            const T g = affine_z(xi, a, z0) > T(0) ? static_cast<T>(gr[i]) : T(0);
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
            const T g = affine_z(xi, sc[c], sf[c]) > T(0) ? static_cast<T>(gr[c]) : T(0);
            out[c] = static_cast<S>(kg[c] * g + kc[c] * (xi - mp[c]) + k0[c]);
          }
        });
  });
}

}  // namespace FASTOPT_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastopt
