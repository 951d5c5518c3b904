// The update kernel of every rule on the CPU (Note [a rule in C++]): one pass over the chunks of a
// group's tensors (chunks of the whole group, so 2,000 small tensors cost about what one tensor of
// the same size does), in parallel over at::get_num_threads() threads, math from
// fastopt/update_math.h.
// Compiled once per CPU capability (Note [capability kernels], ../kernels.h).
#include <ATen/Parallel.h>

#include <limits>

#include "common.h"

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

// fn(S{}, master) for the grads' storage S: with master weights (float16/bfloat16 grads and
// params_out) params and state are float32, else S.
template <typename Fn>
void with_storage(const UpdateArgs& u, Fn&& fn) {
  with_dtype(u.grad_dtype, [&](auto s) {
    using S = decltype(s);
    if constexpr (is_low_precision<S>()) {
      with_bool(u.master, [&](auto kMaster) { fn(s, kMaster); });
    } else {
      fn(s, std::false_type{});
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
template <typename R, typename S, bool kMaster, unsigned kF, bool kPrep, typename T>
void update_chunk(const UpdateArgs& u, const Chunk& c, const typename R::template Scalars<T>& sc,
                  const GradPrep<T>& gp) {
  using P = std::conditional_t<kMaster, float, S>;
  static_assert(R::kStates >= 1 && R::kStates <= 3, "update_chunk walks one to three state slots");
  constexpr bool k0 = R::uses(kF, 0), k1 = R::kStates > 1 && R::uses(kF, 1), k2 = R::kStates > 2 && R::uses(kF, 2);
  P* __restrict__ p = slot<P>(u, kParamSlot, c);
  const S* __restrict__ g = slot<const S>(u, kGradSlot, c);
  P* __restrict__ s0 = k0 ? slot<P>(u, 2, c) : nullptr;
  P* __restrict__ s1 = k1 ? slot<P>(u, 3, c) : nullptr;
  P* __restrict__ s2 = k2 ? slot<P>(u, 4, c) : nullptr;
  S* __restrict__ out = kMaster ? slot<S>(u, 2 + R::kStates, c) : nullptr;
  const int64_t n = c.end - c.begin;
  for (int64_t i = 0; i < n; ++i) {
    T st[R::kStates] = {};
    if constexpr (k0) st[0] = static_cast<T>(s0[i]);
    if constexpr (k1) st[1] = static_cast<T>(s1[i]);
    if constexpr (k2) st[2] = static_cast<T>(s2[i]);
    const T gi = prep<kPrep, T>(static_cast<T>(g[i]), gp);
    const T pi = R::template update<kF>(static_cast<T>(p[i]), gi, st, sc);
    p[i] = static_cast<P>(pi);
    if constexpr (k0) s0[i] = static_cast<P>(st[0]);
    if constexpr (k1) s1[i] = static_cast<P>(st[1]);
    if constexpr (k2) s2[i] = static_cast<P>(st[2]);
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}

template <typename R>
void run_update(const UpdateArgs& u, const typename R::Hyper& hyper) {
  with_storage(u, [&](auto s, auto kMaster) {
    using S = decltype(s);
    using T = typename Compute<S>::type;
    using Scalars = typename R::template Scalars<T>;
    const GradPrep<T> gp = cast_prep<T>(u.prep);
    const auto make = [&](double step) { return R::template scalars<T>(hyper, u.lr, step); };
    with_flags<R::kFlagBits>(R::flags(hyper), [&](auto kF) {
      with_bool(gp.active(), [&](auto kPrep) {
        for_each_active_chunk<Scalars>(u, make, [&](const Chunk& c, const Scalars& sc) {
          update_chunk<R, S, decltype(kMaster)::value, decltype(kF)::value, decltype(kPrep)::value>(u, c, sc, gp);
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
