// Turning runtime flags and dtypes into template parameters, for the CPU and CUDA update kernels
// alike (host code: it picks which kernel instantiation runs).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <type_traits>
#include <utility>

#include "fastopt/update_math.h"

namespace fastopt {

// fn(std::integral_constant<bool, b>) so that `decltype(flag)::value` is a compile-time constant.
template <typename Fn>
void with_bool(bool b, Fn&& fn) {
  if (b) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// with_bools(fn, b1, b2, ...) calls fn(integral_constant<bool, b1>{}, integral_constant<bool, b2>{}, ...):
// one instantiation per combination of runtime flags.
template <typename Fn>
void with_bools(Fn&& fn) {
  fn();
}
template <typename Fn, typename... Bools>
void with_bools(Fn&& fn, bool b, Bools... rest) {
  with_bool(b, [&](auto k) { with_bools([&](auto... ks) { fn(k, ks...); }, rest...); });
}

// with_flags<kBits>(f, fn) calls fn(integral_constant<unsigned, f>{}) for a flag mask f < 2^kBits (a
// rule's flags(), Note [a rule in C++]): one instantiation per combination of flags.
template <unsigned kBits, typename Fn, unsigned... kMasks>
void with_flags_of(unsigned f, Fn& fn, std::integer_sequence<unsigned, kMasks...>) {
  static_cast<void>(((f == kMasks ? (fn(std::integral_constant<unsigned, kMasks>{}), true) : false) || ...));
}
template <unsigned kBits, typename Fn>
void with_flags(unsigned f, Fn&& fn) {
  with_flags_of<kBits>(f, fn, std::make_integer_sequence<unsigned, (1u << kBits)>{});
}

template <typename S>
constexpr bool is_low_precision() {
  return std::is_same_v<S, at::BFloat16> || std::is_same_v<S, at::Half>;
}

using NearestStore = std::integral_constant<ParamStore, ParamStore::kNearest>;

// fn(kStore) for float16/bfloat16 params without masters (Note [param store], update_math.h);
// check_rounding (fastopt/update_op.h) refuses kStochastic for float16 before any kernel runs.
template <typename S, typename Fn>
void with_param_store(ParamStore store, Fn&& fn) {
  switch (store) {
    case ParamStore::kNearest:
      return fn(NearestStore{});
    case ParamStore::kKahan:
      return fn(std::integral_constant<ParamStore, ParamStore::kKahan>{});
    case ParamStore::kStochastic:
      if constexpr (std::is_same_v<S, at::BFloat16>) fn(std::integral_constant<ParamStore, ParamStore::kStochastic>{});
      return;
  }
}

// The storage dtypes an update op accepts: without master weights, params and state are the
// grads' dtype (float64, float32, float16 or bfloat16); with them (fp16/bf16 grads and a non-empty
// `params_out`), params (the masters) and state are float32 and params_out is the grads' dtype.
inline void check_storage(const char* op, at::ScalarType grad_dtype, at::ScalarType param_dtype, bool master) {
  const bool low = grad_dtype == at::kHalf || grad_dtype == at::kBFloat16;
  TORCH_CHECK(low || grad_dtype == at::kFloat || grad_dtype == at::kDouble, "\"", op, "\" not implemented for '",
              c10::toString(grad_dtype), "'");
  if (low) {
    TORCH_CHECK(param_dtype == (master ? at::kFloat : grad_dtype), op, ": params are ", param_dtype, " for ",
                grad_dtype, " grads", master ? " (master weights must be float32)" : "");
  } else {
    TORCH_CHECK(!master, op, ": master weights are only for float16/bfloat16 params");
    TORCH_CHECK(param_dtype == grad_dtype, op, ": params are ", param_dtype, ", grads ", grad_dtype);
  }
}

// check_storage(), then fn(S{}, master) with S the gradient storage type.
template <typename Fn>
void dispatch_storage(const char* op, at::ScalarType grad_dtype, at::ScalarType param_dtype,
                      bool master, Fn&& fn) {
  check_storage(op, grad_dtype, param_dtype, master);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_dtype, "fastopt_update", [&] {
    if constexpr (is_low_precision<scalar_t>()) {
      with_bool(master, [&](auto kMaster) { fn(scalar_t{}, kMaster); });
    } else {
      fn(scalar_t{}, std::false_type{});
    }
  });
}

}  // namespace fastopt
