// For `make cuda-check` only: torch's CPU wheels ship the c10/cuda headers without this one,
// which torch's own CUDA builds generate. It only says that c10_cuda is a shared library.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
