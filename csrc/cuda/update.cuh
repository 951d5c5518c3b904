// The update kernel of every rule on CUDA, shared by update.cu (the steps that store as torch
// does) and update_stores.cu (bf16 state and compensated params: Note [stochastic state], Note
// [param store]), two translation units that nvcc compiles in parallel.
#pragma once

#include <type_traits>

#include "engine.cuh"
#include "fastopt/dispatch.h"
#include "fastopt/stochastic_round.h"
#include "fastopt/update_op.h"

namespace fastopt {
namespace cuda {

template <typename R>
struct UpdateParams {
  typename R::Hyper hyper;
  DeviceLr lr;
  DeviceGradArgs ga;
};

// Whether the flags kF of rule R walk state slot k.
template <typename R, unsigned kF>
constexpr bool walks(int k) {
  return k < R::kStates && R::uses(kF, k);
}

// One chunk of rule R. S: grad storage; P: param storage (float32 with master weights); Q: state
// storage (P, or bfloat16 with kStochastic: Note [stochastic state], update_math.h); T: compute
// type; kF: the rule's flags (which state slots are walked, which branches run); kStore: how
// float16/bfloat16 params without masters are stored (Note [param store]; with kKahan the
// params_out slot holds the compensation buffers). The stores are the CPU kernels' (csrc/cpu/
// kernels/update.cpp), bit for bit given the same float32 values: the random bits of
// Note [deterministic stochastic rounding] keyed by (the tensor's seed, its step, the element's
// index in the tensor), the Kahan residual rounded in integer arithmetic for bfloat16.
template <typename R, typename S, bool kMaster, bool kStochastic, ParamStore kStore, unsigned kF, bool kPrep>
struct UpdateChunk {
  using T = compute_t<S>;
  using P = std::conditional_t<kMaster, float, S>;
  using Q = std::conditional_t<kStochastic, at::BFloat16, P>;
  static constexpr int kStates = R::kStates;
  static constexpr bool kKahan = kStore == ParamStore::kKahan, kRandomParam = kStore == ParamStore::kStochastic;
  static_assert(!kStochastic || std::is_same_v<T, float>, "stochastic state rounds float32");
  static_assert(kStore == ParamStore::kNearest || (!kMaster && is_low_precision<S>()),
                "compensation is for float16/bfloat16 params without masters");
  // the random streams: seed for state slots 0 and 1, seed + 1 for slot 2 and the param's
  static constexpr bool kStream0 = kStochastic && (walks<R, kF>(0) || walks<R, kF>(1));
  static constexpr bool kStream1 = (kStochastic && walks<R, kF>(2)) || kRandomParam;
  static_assert(kParamRandomSlot / 2 == 1, "the param's random bits are stream seed + 1's");

  P* p;
  const S* g;
  Q* s[kStates];  // nullptr for a slot the flags do not use
  S* out;  // params_out: the rounded params (masters) or the compensation buffers (kKahan)
  typename R::template Scalars<T> sc;
  GradPrep<T> gp;
  StochasticStream streams[2] = {};

  __device__ UpdateChunk(const Tables& tb, int32_t t, float step, int64_t start, const UpdateParams<R>& prm)
      : p(tb.slot<P>(kParamSlot, t)),
        g(tb.slot<const S>(kGradSlot, t)),
        out(kMaster || kKahan ? tb.slot<S>(params_out_slot<R>(), t) : nullptr),
        sc(R::template scalars<T>(prm.hyper, prm.lr.read(), static_cast<double>(step))),
        gp(prm.ga.template read<T>()) {
#pragma unroll
    for (int k = 0; k < kStates; ++k) s[k] = walks<R, kF>(k) ? tb.slot<Q>(2 + k, t) : nullptr;
    if constexpr (kStream0 || kStream1) {
      // a chunk's indices share their high 32 bits (kChunk divides 2^32: stochastic_round.h)
      const uint64_t seed = static_cast<uint64_t>(tb.seeds[t]);
      const uint64_t count = static_cast<uint64_t>(step);
      const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(start) >> 32);
      streams[0] = stochastic_stream(seed, count, hi);
      streams[1] = stochastic_stream(seed + 1, count, hi);
    }
  }

  static __device__ __forceinline__ Q stochastic(T v, uint32_t r) {
    if constexpr (kStochastic) {
      return bf16_stochastic(v, r);
    } else {
      return static_cast<Q>(v);
    }
  }

  template <int N>
  __device__ __forceinline__ void apply(int64_t i) {
    T rp[N], rg[N], rs[kStates][N];
    load<N>(p, i, rp);
    load<N>(g, i, rg);
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      if (walks<R, kF>(k)) load<N>(s[k], i, rs[k]);
    }
    if constexpr (kKahan) {
      T rc[N];
      load<N>(out, i, rc);
#pragma unroll
      for (int e = 0; e < N; ++e) rp[e] += rc[e];
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      T st[kStates] = {};
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        if (walks<R, kF>(k)) st[k] = rs[k][e];
      }
      rp[e] = R::template update<kF>(rp[e], prep<kPrep, T>(rg[e], gp), st, sc);
#pragma unroll
      for (int k = 0; k < kStates; ++k) rs[k][e] = st[k];
    }
    if constexpr (kStream0 || kStream1 || kKahan) {
      Q qs[kStates][N];
      P ps[N];
      [[maybe_unused]] S cs[N];  // the compensation buffers' values (kKahan)
#pragma unroll
      for (int e = 0; e < N; ++e) {
        // slots 0 and 1 share stream 0's 32 bits (low and high halves), slot 2 and the param stream 1's
        const uint32_t j = static_cast<uint32_t>(i + e);
        [[maybe_unused]] const uint32_t r01 = kStream0 ? streams[0].bits(j) : 0u;
        [[maybe_unused]] const uint32_t r23 = kStream1 ? streams[1].bits(j) : 0u;
        if constexpr (kKahan) {
          kahan_store(rp[e], ps[e], cs[e]);  // stochastic_round.h
        } else if constexpr (kRandomParam) {
          ps[e] = bf16_stochastic(rp[e], r23 >> 16);
        } else {
          ps[e] = static_cast<P>(rp[e]);
        }
        if constexpr (walks<R, kF>(0)) qs[0][e] = stochastic(rs[0][e], r01);
        if constexpr (walks<R, kF>(1)) qs[1][e] = stochastic(rs[1][e], r01 >> 16);
        if constexpr (walks<R, kF>(2)) qs[2][e] = stochastic(rs[2][e], r23);
      }
      store_values<N>(p, i, ps);
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        if (walks<R, kF>(k)) store_values<N>(s[k], i, qs[k]);
      }
      if constexpr (kKahan) store_values<N>(out, i, cs);
    } else {
      store<N>(p, i, rp);
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        if (walks<R, kF>(k)) store<N>(s[k], i, rs[k]);
      }
    }
    if constexpr (kMaster) store<N>(out, i, rp);
  }
};

// Launches UpdateChunk for the rule's flags and grad transform (kPrep: whether it can change a
// grad; the stores other than torch's always take it: neutral values change nothing, Note
// [neutral grad prep], and half the instantiations keep update_stores.cu's compile time down).
template <typename R, typename S, bool kMaster, bool kRandomState, ParamStore kHow>
void launch_rule(const CudaPlan& plan, const typename R::Hyper& h, const UpdateParams<R>& prm) {
  constexpr bool kPlain = !kRandomState && kHow == ParamStore::kNearest;
  with_flags<R::kFlagBits>(R::flags(h), [&](auto kF) {
    // a constant: in a lambda that captures kF, nvcc's host pass takes decltype(kF) for a reference
    constexpr unsigned kFlags = decltype(kF)::value;
    with_bool(!kPlain || prm.ga.active(), [&](auto kPrep) {
      if constexpr (kPlain || decltype(kPrep)::value) {
        launch_update<UpdateChunk<R, S, kMaster, kRandomState, kHow, kFlags, decltype(kPrep)::value>>(plan, prm);
      }
    });
  });
}

// The launch of a plan that stores bf16 state or compensated params (update_stores.cu).
template <typename R>
void launch_stores(const CudaPlan& plan, const typename R::Hyper& h, const UpdateParams<R>& prm);

}  // namespace cuda
}  // namespace fastopt
