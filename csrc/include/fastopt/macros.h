// Portability macros shared by the C++ and CUDA sources.
#pragma once

// FASTOPT_HD: the shared math's functions, always inlined. On the host this also keeps them out of
// the symbol table: a capability kernel (Note [capability kernels], csrc/cpu/kernels.h) never
// leaves an out-of-line copy, compiled for its CPU, that the linker could pick for another.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTOPT_HD __host__ __device__ __forceinline__
#else
#define FASTOPT_HD inline __attribute__((always_inline))
#endif
