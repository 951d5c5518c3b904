// The update kernels of every rule on the CPU: one pass over the chunks of a group's tensors
// (chunks of the whole group, so 2,000 small tensors cost about what one tensor of the same size
// does), in parallel over at::get_num_threads() threads, math from fastopt/update_math.h.
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

// ---- Adam / AdamW ---------------------------------------------------------------------------

template <typename S, bool kMaster, bool kL2, bool kAmsgrad, bool kPrep, typename T>
void adam_chunk(const UpdateArgs& u, const Chunk& c, const AdamScalars<T>& sc, const GradPrep<T>& gp) {
  using P = std::conditional_t<kMaster, float, S>;  // storage of params (masters) and state
  using Sl = AdamSlots;
  P* __restrict__ p = slot<P>(u, Sl::kParam, c);
  const S* __restrict__ g = slot<const S>(u, Sl::kGrad, c);
  P* __restrict__ m = slot<P>(u, Sl::kExpAvg, c);
  P* __restrict__ v = slot<P>(u, Sl::kExpAvgSq, c);
  P* __restrict__ vmax = kAmsgrad ? slot<P>(u, Sl::kMaxExpAvgSq, c) : nullptr;
  S* __restrict__ out = kMaster ? slot<S>(u, Sl::kParamOut, c) : nullptr;
  const int64_t n = c.end - c.begin;
  for (int64_t i = 0; i < n; ++i) {
    T mi = static_cast<T>(m[i]);
    T vi = static_cast<T>(v[i]);
    T vmaxi = kAmsgrad ? static_cast<T>(vmax[i]) : T(0);
    const T gi = prep<kPrep, T>(static_cast<T>(g[i]), gp);
    const T pi = adam_element<T, kL2, kAmsgrad>(static_cast<T>(p[i]), gi, mi, vi, vmaxi, sc);
    p[i] = static_cast<P>(pi);
    m[i] = static_cast<P>(mi);
    v[i] = static_cast<P>(vi);
    if constexpr (kAmsgrad) vmax[i] = static_cast<P>(vmaxi);
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}

// ---- Adagrad --------------------------------------------------------------------------------

template <typename S, bool kMaster, bool kL2, bool kPrep, typename T>
void adagrad_chunk(const UpdateArgs& u, const Chunk& c, const AdagradScalars<T>& sc, const GradPrep<T>& gp) {
  using P = std::conditional_t<kMaster, float, S>;
  using Sl = AdagradSlots;
  P* __restrict__ p = slot<P>(u, Sl::kParam, c);
  const S* __restrict__ g = slot<const S>(u, Sl::kGrad, c);
  P* __restrict__ sum = slot<P>(u, Sl::kSum, c);
  S* __restrict__ out = kMaster ? slot<S>(u, Sl::kParamOut, c) : nullptr;
  const int64_t n = c.end - c.begin;
  for (int64_t i = 0; i < n; ++i) {
    T si = static_cast<T>(sum[i]);
    const T gi = prep<kPrep, T>(static_cast<T>(g[i]), gp);
    const T pi = adagrad_element<T, kL2>(static_cast<T>(p[i]), gi, si, sc);
    p[i] = static_cast<P>(pi);
    sum[i] = static_cast<P>(si);
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}

// ---- RMSprop --------------------------------------------------------------------------------

template <typename S, bool kMaster, bool kL2, bool kCentered, bool kMomentum, bool kPrep, typename T>
void rmsprop_chunk(const UpdateArgs& u, const Chunk& c, const RMSpropScalars<T>& sc, const GradPrep<T>& gp) {
  using P = std::conditional_t<kMaster, float, S>;
  using Sl = RMSpropSlots;
  P* __restrict__ p = slot<P>(u, Sl::kParam, c);
  const S* __restrict__ g = slot<const S>(u, Sl::kGrad, c);
  P* __restrict__ v = slot<P>(u, Sl::kSquareAvg, c);
  P* __restrict__ ga = kCentered ? slot<P>(u, Sl::kGradAvg, c) : nullptr;
  P* __restrict__ buf = kMomentum ? slot<P>(u, Sl::kMomentumBuffer, c) : nullptr;
  S* __restrict__ out = kMaster ? slot<S>(u, Sl::kParamOut, c) : nullptr;
  const int64_t n = c.end - c.begin;
  for (int64_t i = 0; i < n; ++i) {
    T vi = static_cast<T>(v[i]);
    T gai = kCentered ? static_cast<T>(ga[i]) : T(0);
    T bufi = kMomentum ? static_cast<T>(buf[i]) : T(0);
    const T gi = prep<kPrep, T>(static_cast<T>(g[i]), gp);
    const T pi = rmsprop_element<T, kL2, kCentered, kMomentum>(static_cast<T>(p[i]), gi, vi, gai, bufi, sc);
    p[i] = static_cast<P>(pi);
    v[i] = static_cast<P>(vi);
    if constexpr (kCentered) ga[i] = static_cast<P>(gai);
    if constexpr (kMomentum) buf[i] = static_cast<P>(bufi);
    if constexpr (kMaster) out[i] = static_cast<S>(pi);
  }
}

}  // namespace

void adam(const UpdateArgs& u, const AdamHyper& hyper) {
  const bool l2 = hyper.weight_decay != 0 && !hyper.decoupled;
  with_storage(u, [&](auto s, auto kMaster) {
    using S = decltype(s);
    using T = typename Compute<S>::type;
    const GradPrep<T> gp = cast_prep<T>(u.prep);
    const auto make = [&](double step) { return adam_scalars<T>(hyper, u.lr, step); };
    with_bools(
        [&](auto kL2, auto kAms, auto kPrep) {
          for_each_active_chunk<AdamScalars<T>>(u, make, [&](const Chunk& c, const AdamScalars<T>& sc) {
            adam_chunk<S, decltype(kMaster)::value, decltype(kL2)::value, decltype(kAms)::value,
                       decltype(kPrep)::value>(u, c, sc, gp);
          });
        },
        l2, hyper.amsgrad, gp.active());
  });
}

void adagrad(const UpdateArgs& u, const AdagradHyper& hyper) {
  with_storage(u, [&](auto s, auto kMaster) {
    using S = decltype(s);
    using T = typename Compute<S>::type;
    const GradPrep<T> gp = cast_prep<T>(u.prep);
    const auto make = [&](double step) { return adagrad_scalars<T>(hyper, u.lr, step); };
    with_bools(
        [&](auto kL2, auto kPrep) {
          for_each_active_chunk<AdagradScalars<T>>(u, make, [&](const Chunk& c, const AdagradScalars<T>& sc) {
            adagrad_chunk<S, decltype(kMaster)::value, decltype(kL2)::value, decltype(kPrep)::value>(u, c, sc, gp);
          });
        },
        hyper.weight_decay != 0, gp.active());
  });
}

void rmsprop(const UpdateArgs& u, const RMSpropHyper& hyper) {
  with_storage(u, [&](auto s, auto kMaster) {
    using S = decltype(s);
    using T = typename Compute<S>::type;
    const GradPrep<T> gp = cast_prep<T>(u.prep);
    const RMSpropScalars<T> scalars = rmsprop_scalars<T>(hyper, u.lr);  // RMSprop does not use the step
    const auto make = [&](double) { return scalars; };
    with_bools(
        [&](auto kL2, auto kCentered, auto kMomentum, auto kPrep) {
          for_each_active_chunk<RMSpropScalars<T>>(u, make, [&](const Chunk& c, const RMSpropScalars<T>& sc) {
            rmsprop_chunk<S, decltype(kMaster)::value, decltype(kL2)::value, decltype(kCentered)::value,
                          decltype(kMomentum)::value, decltype(kPrep)::value>(u, c, sc, gp);
          });
        },
        hyper.weight_decay != 0, hyper.centered, hyper.momentum > 0, gp.active());
  });
}

}  // namespace FASTOPT_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastopt
