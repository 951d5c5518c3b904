// The update kernel of every rule on the CPU (Note [a rule in C++]): one pass over the chunks of a
// group's tensors (chunks of the whole group, so 2,000 small tensors cost about what one tensor of
// the same size does), in parallel over at::get_num_threads() threads, math from
// fastopt/update_math.h.
// Compiled once per CPU capability (Note [capability kernels], ../kernels.h).
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "common.h"
#include "fastopt/stochastic_round.h"

namespace fastopt {
namespace cpu {
namespace FASTOPT_CPU_CAPABILITY {

namespace {

template <typename T>
GradPrep<T> cast_prep(const GradPrep<double>& p) {
  return {static_cast<T>(p.inv_scale), static_cast<T>(p.clip), static_cast<T>(p.coef), static_cast<T>(p.sign)};
}

template <typename X>
X* slot(const UpdateArgs& u, size_t s, const Chunk& c) {
  return u.ptrs[s] == nullptr ? nullptr : static_cast<X*>(u.ptrs[s][c.tensor]) + c.begin;
}

// fn(S{}, master, stochastic, store) for the grads' storage S: with master weights (float16/bfloat16
// grads and params_out) params and state are float32, else S; with stochastic state (float32
// compute only: the caller checks) the state is bfloat16 (Note [stochastic state]); `store`: how
// float16/bfloat16 params without masters are written (Note [param store]), else kNearest.
template <typename Fn>
void with_storage(const UpdateArgs& u, Fn&& fn) {
  with_dtype(u.grad_dtype, [&](auto s) {
    using S = decltype(s);
    if constexpr (std::is_same_v<S, double>) {
      fn(s, std::false_type{}, std::false_type{}, NearestStore{});
    } else {
      with_bool(u.stochastic_state, [&](auto kStochastic) {
        if constexpr (!is_low_precision<S>()) {
          fn(s, std::false_type{}, kStochastic, NearestStore{});
        } else if (u.master) {
          fn(s, std::true_type{}, kStochastic, NearestStore{});
        } else {
          with_param_store<S>(u.store, [&](auto kStore) { fn(s, std::false_type{}, kStochastic, kStore); });
        }
      });
    }
  });
}

// fn(chunk, scalars) for every chunk of a tensor with a grad (Note [absent grads]), in parallel;
// scalars = make(step) of the chunk's tensor, made once per distinct step count in a thread's range
// (the whole group usually has one).
template <typename Scalars, typename Make, typename Fn>
void for_each_active_chunk(const UpdateArgs& u, const Make& make, const Fn& fn) {
  void* const* grads = u.ptrs[kGradSlot];
  at::parallel_for(0, u.n_chunks, 1, [&](int64_t lo, int64_t hi) {
    double last = std::numeric_limits<double>::quiet_NaN();
    Scalars sc{};
    for (int64_t i = lo; i < hi; ++i) {
      const Chunk& c = u.chunks[i];
      if (grads[c.tensor] == no_grad_address()) continue;
      const double step = u.steps[c.tensor];
      if (!(step == last)) {
        sc = make(step);
        last = step;
      }
      fn(c, sc);
    }
  });
}

// One chunk of rule R (Note [a rule in C++]): each element loaded into the compute type T,
// R::update<kF>, stored back. S: the grads' storage; P: params' and state's (float32 masters).
// Every slot has a pointer of its own, declared __restrict__ (the slots never overlap: the callers
// check it), so that the loop vectorizes without runtime alias checks.
// With kStochastic the state Q is bfloat16, stored with the bits of Note [stochastic state]
// (update_math.h); else Q is P, stored rounded to nearest. kStore: how the params are stored
// (Note [param store]; with kKahan the params_out slot holds the compensation buffers).
template <typename R, typename S, bool kMaster, bool kStochastic, ParamStore kStore, unsigned kF, bool kPrep,
          typename T>
void update_chunk(const UpdateArgs& u, const Chunk& c, const typename R::template Scalars<T>& sc,
                  const GradPrep<T>& gp) {
  using P = std::conditional_t<kMaster, float, S>;
  using Q = std::conditional_t<kStochastic, at::BFloat16, P>;
  static_assert(R::kStates >= 1 && R::kStates <= 3, "update_chunk walks one to three state slots");
  static_assert(!kStochastic || std::is_same_v<T, float>, "stochastic state rounds float32");
  constexpr bool kKahan = kStore == ParamStore::kKahan, kRandomParam = kStore == ParamStore::kStochastic;
  static_assert(kStore == ParamStore::kNearest || (!kMaster && is_low_precision<S>()),
                "compensation is for float16/bfloat16 params without masters");
  constexpr bool k0 = R::uses(kF, 0), k1 = R::kStates > 1 && R::uses(kF, 1), k2 = R::kStates > 2 && R::uses(kF, 2);
  P* __restrict__ p = slot<P>(u, kParamSlot, c);
  const S* __restrict__ g = slot<const S>(u, kGradSlot, c);
  Q* __restrict__ s0 = k0 ? slot<Q>(u, 2, c) : nullptr;
  Q* __restrict__ s1 = k1 ? slot<Q>(u, 3, c) : nullptr;
  Q* __restrict__ s2 = k2 ? slot<Q>(u, 4, c) : nullptr;
  S* __restrict__ out = kMaster ? slot<S>(u, 2 + R::kStates, c) : nullptr;
  S* __restrict__ comp = kKahan ? slot<S>(u, 2 + R::kStates, c) : nullptr;
  // the random streams: seed for slots 0 and 1, seed + 1 for slots 2 and 3 (the param's, Note
  // [param store]); a chunk's indices share their high 32 bits (stochastic_round.h)
  constexpr bool kStream0 = kStochastic && (k0 || k1), kStream1 = (kStochastic && k2) || kRandomParam;
  static_assert(kParamRandomSlot / 2 == 1, "the param's random bits are stream seed + 1's");
  StochasticStream streams[2] = {};
  if constexpr (kStream0 || kStream1) {
    const uint64_t seed = static_cast<uint64_t>(u.seeds[c.tensor]);
    const uint64_t step = static_cast<uint64_t>(u.steps[c.tensor]);
    const uint32_t hi = static_cast<uint32_t>(c.begin >> 32);
    streams[0] = stochastic_stream(seed, step, hi);
    streams[1] = stochastic_stream(seed + 1, step, hi);
  }
  // the low 32 bits of the element's index, counted in 32-bit lanes (derived from the 64-bit i,
  // the vector loop widened it to 64-bit lanes: a single-thread AdamW step of 10M took 4% longer)
  uint32_t j = static_cast<uint32_t>(c.begin);
  const int64_t n = c.end - c.begin;
  for (int64_t i = 0; i < n; ++i, ++j) {
    T st[R::kStates] = {};
    if constexpr (k0) st[0] = static_cast<T>(s0[i]);
    if constexpr (k1) st[1] = static_cast<T>(s1[i]);
    if constexpr (k2) st[2] = static_cast<T>(s2[i]);
    const T gi = prep<kPrep, T>(static_cast<T>(g[i]), gp);
    T pin = static_cast<T>(p[i]);
    if constexpr (kKahan) pin += static_cast<T>(comp[i]);
    const T pi = R::template update<kF>(pin, gi, st, sc);
    // slots 0 and 1 share stream 0's 32 bits (low and high halves), slots 2 and 3 stream 1's
    uint32_t r01 = 0, r23 = 0;
    if constexpr (kStream0) r01 = streams[0].bits(j);
    if constexpr (kStream1) r23 = streams[1].bits(j);
    if constexpr (kKahan) {
      kahan_store(pi, p[i], comp[i]);  // stochastic_round.h
    } else if constexpr (kRandomParam) {
      p[i] = bf16_stochastic(pi, r23 >> 16);
    } else {
      p[i] = static_cast<P>(pi);
    }
    if constexpr (kStochastic) {
      if constexpr (k0) s0[i] = bf16_stochastic(st[0], r01);
      if constexpr (k1) s1[i] = bf16_stochastic(st[1], r01 >> 16);
      if constexpr (k2) s2[i] = bf16_stochastic(st[2], r23);
    } else {
      if constexpr (k0) s0[i] = static_cast<Q>(st[0]);
      if constexpr (k1) s1[i] = static_cast<Q>(st[1]);
      if constexpr (k2) s2[i] = static_cast<Q>(st[2]);
    }
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}

template <typename R>
void run_update(const UpdateArgs& u, const typename R::Hyper& hyper) {
  with_storage(u, [&](auto s, auto kMaster, auto kStochastic, auto kStore) {
    using S = decltype(s);
    using T = typename Compute<S>::type;
    using Scalars = typename R::template Scalars<T>;
    const GradPrep<T> gp = cast_prep<T>(u.prep);
    const auto make = [&](double step) { return R::template scalars<T>(hyper, u.lr, step); };
    with_flags<R::kFlagBits>(R::flags(hyper), [&](auto kF) {
      with_bool(gp.active(), [&](auto kPrep) {
        for_each_active_chunk<Scalars>(u, make, [&](const Chunk& c, const Scalars& sc) {
          update_chunk<R, S, decltype(kMaster)::value, decltype(kStochastic)::value, decltype(kStore)::value,
                       decltype(kF)::value, decltype(kPrep)::value>(u, c, sc, gp);
        });
      });
    });
  });
}

}  // namespace

#define FASTOPT_CPU_UPDATE_DEFINE(R) \
  void update(const UpdateArgs& u, const R::Hyper& h) { run_update<R>(u, h); }
FASTOPT_RULES(FASTOPT_CPU_UPDATE_DEFINE)

}  // namespace FASTOPT_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastopt
