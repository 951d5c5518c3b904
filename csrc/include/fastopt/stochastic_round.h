// Deterministic stochastic rounding of float32 to bfloat16, shared by the C++ and CUDA kernels
// (issue 27, low-precision state: the rounding comes first, the state dtypes that use it next).
//
// Note [deterministic stochastic rounding]: a value is rounded up or down with probabilities that
// make the rounding unbiased (E[round(x)] = x), from random bits that are a function of (a seed,
// the step, the element's index in its tensor) only: a counter-based generator, no state. So the
// result does not depend on the backend's chunking or thread count, the CPU kernels and the
// specification (fastopt/reference/rounding.py, the same arithmetic on int64 tensors) give the
// same bits, and a run resumed from a checkpoint (seed and step in the state dict) rounds as the
// uninterrupted one. The bits: the five words seed (low, high), step, index (low, high), each
// times an odd constant, summed mod 2^32, then lowbias32's finalizer (two multiply-xorshift
// rounds). The rounding adds the low 16 random bits to the float32 bit pattern and truncates to
// its high 16 bits: rounds the magnitude up with probability (dropped bits) / 2^16; a NaN stays a
// quiet NaN, infinities stay, a value within the last bf16 ulp below the largest finite one may
// round up to infinity (as round-to-nearest may).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastopt/macros.h"

namespace fastopt {

// The odd constants of the word mix (from xxHash and the golden ratio) and of lowbias32.
constexpr uint32_t kSrSeedLo = 0xC2B2AE3Du, kSrSeedHi = 0x27D4EB2Fu, kSrStep = 0x85EBCA77u,
                   kSrIndexLo = 0x9E3779B1u, kSrIndexHi = 0x165667B1u, kSrMix1 = 0x7FEB352Du, kSrMix2 = 0x846CA68Bu;

// The random bits of one (seed, step) along the indices whose high 32 bits are `index_hi`: the
// word mix is a sum, so its part that does not change along a kernel's chunk is summed once
// (a chunk never crosses a multiple of 2^32: chunk sizes divide it). bits(i) are the bits of
// index (index_hi << 32) + i.
struct StochasticStream {
  uint32_t base;

  FASTOPT_HD uint32_t bits(uint32_t index_lo) const {
    uint32_t h = base + index_lo * kSrIndexLo;  // unsigned: wraps mod 2^32
    h ^= h >> 16;
    h *= kSrMix1;
    h ^= h >> 15;
    h *= kSrMix2;
    h ^= h >> 16;
    return h;
  }
};

FASTOPT_HD StochasticStream stochastic_stream(uint64_t seed, uint64_t step, uint32_t index_hi) {
  return {static_cast<uint32_t>(seed) * kSrSeedLo + static_cast<uint32_t>(seed >> 32) * kSrSeedHi +
          static_cast<uint32_t>(step) * kSrStep + index_hi * kSrIndexHi};
}

// 32 random bits for (seed, step, index): Note [deterministic stochastic rounding].
FASTOPT_HD uint32_t stochastic_bits(uint64_t seed, uint64_t step, uint64_t index) {
  return stochastic_stream(seed, step, static_cast<uint32_t>(index >> 32)).bits(static_cast<uint32_t>(index));
}

FASTOPT_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// The bfloat16 bit pattern of float32 `x` rounded stochastically with the random bits `r`.
FASTOPT_HD uint16_t bf16_bits_stochastic(float x, uint32_t r) {
  const uint32_t u = float_bits(x);
  // at most 0xFF80FFFF for a number: no carry into bit 32. A NaN stays a quiet NaN. One select, no
  // branch: with an early return the kernels' loops stayed scalar (control flow in the loop)
  const uint16_t rounded = static_cast<uint16_t>((u + (r & 0xFFFFu)) >> 16);
  const uint16_t nan = static_cast<uint16_t>((u >> 16) | 0x0040u);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded;
}

// The bfloat16 bit pattern of float32 `x` rounded to nearest, ties to even, as c10::BFloat16
// rounds it (a NaN becomes 0x7FC0): integer arithmetic and one select, which vectorizes where
// the conversion's NaN branch kept a loop scalar (the kahan store, Note [param store]).
FASTOPT_HD uint16_t bf16_bits_nearest(float x) {
  const uint32_t u = float_bits(x);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0u) : rounded;
}

FASTOPT_HD float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// The stores of the CPU and CUDA kernels (csrc/cpu/kernels/update.cpp, csrc/cuda/update.cuh), one
// definition for both so that they store the same bits.

// `v` stored as bfloat16 with the random bits r, their low 16 counting (Note [stochastic state]).
FASTOPT_HD c10::BFloat16 bf16_stochastic(float v, uint32_t r) {
  return c10::BFloat16(bf16_bits_stochastic(v, r), c10::BFloat16::from_bits());
}

// Note [param store], compensation="kahan": the param w (param + compensation, in float32) stored
// as p = round(w) and its residual c = round(w - p), c = 0 where p is not finite. bfloat16 rounds
// in integer arithmetic (bf16_bits_nearest: with c10::BFloat16's conversion the CPU loop stayed
// scalar, 10x the master-weights step).
template <typename S>
FASTOPT_HD void kahan_store(float w, S& rounded, S& residual) {
  static_assert(std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>, "kahan stores float16/bfloat16");
  float back;
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const uint16_t bits = bf16_bits_nearest(w);
    rounded = S(bits, S::from_bits());
    back = bf16_bits_to_float(bits);
  } else {
    rounded = static_cast<S>(w);
    back = static_cast<float>(rounded);
  }
  const float rest = (float_bits(back) & 0x7FFFFFFFu) < 0x7F800000u ? w - back : 0.0f;  // finite
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    residual = S(bf16_bits_nearest(rest), S::from_bits());
  } else {
    residual = static_cast<S>(rest);
  }
}

}  // namespace fastopt
