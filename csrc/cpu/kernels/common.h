// Shared by the kernel files of csrc/cpu/kernels/, which are compiled once per CPU capability into
// namespace fastopt::cpu::FASTOPT_CPU_CAPABILITY (Note [capability kernels], ../kernels.h): only
// inline code and templates, for that namespace.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "../kernels.h"
#include "fastopt/dispatch.h"

#ifndef FASTOPT_CPU_CAPABILITY
#error "csrc/cpu/kernels/ files are compiled once per capability, with -DFASTOPT_CPU_CAPABILITY=<namespace>"
#endif

namespace fastopt {
namespace cpu {
namespace FASTOPT_CPU_CAPABILITY {

// The compute type of a storage type: float for float32/float16/bfloat16, double for float64.
template <typename S>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

// fn(S{}) for the storage type S of `dtype`, one of the four the callers accept (they refuse the
// others before calling a kernel).
template <typename Fn>
void with_dtype(c10::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Double:
      return fn(double{});
    case c10::ScalarType::Float:
      return fn(float{});
    case c10::ScalarType::Half:
      return fn(c10::Half{});
    case c10::ScalarType::BFloat16:
      return fn(c10::BFloat16{});
    default:
      return;
  }
}

}  // namespace FASTOPT_CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastopt
