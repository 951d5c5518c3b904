// The address a plan's kernels see for a param without a grad. Host and device code; no ATen.
#pragma once

#include <cstdint>

namespace fastopt {

// Note [absent grads]: a planned param without a grad this step keeps its place in the plan; its
// grad address is kNoGrad and the kernels skip it (no update, no step count), as torch.optim skips
// a param whose .grad is None. Not 0: an empty tensor's address may be 0.
#ifdef __CUDACC__
__host__ __device__
#endif
inline void* no_grad_address() { return reinterpret_cast<void*>(~uintptr_t(0)); }

}  // namespace fastopt
