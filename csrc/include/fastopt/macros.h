// Portability macros shared by the C++ and CUDA sources.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTOPT_HD __host__ __device__ __forceinline__
#else
#define FASTOPT_HD inline
#endif
