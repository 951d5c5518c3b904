// The CPU kernels that are compiled once per CPU capability (csrc/cpu/kernels/*.cpp, see
// CMakeLists.txt) and the arguments they take. Everything around them (checks, plans, binding,
// allocation) is compiled once, for the baseline, and calls them through kernels() (capability.h).
//
// Note [capability kernels]: a kernel file is compiled three times on x86-64 (-march=x86-64-v2,
// x86-64-v3, x86-64-v4), each time into its own namespace (FASTOPT_CPU_CAPABILITY: DEFAULT, AVX2,
// AVX512), so that the three builds of one function are three symbols. What such a file
// instantiates outside that namespace could be merged by the linker with the baseline's copy of the
// same inline function and leak AVX instructions into baseline code (a SIGILL on a CPU without
// them): so the kernels take plain structs and raw pointers, allocate nothing and build no error
// message (the baseline callers check and allocate), and the baseline objects come first on the
// link line. tests/test_cpu_capability.py reads the built library's disassembly and fails on any
// AVX2 or AVX-512 instruction outside the namespaces allowed it.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "fastopt/no_grad.h"
#include "fastopt/update_math.h"

namespace fastopt {
namespace cpu {

// Note [chunk size]: a chunk is the unit of work one worker takes, so its size is tuned per
// target: on the CPU a chunk is one task of at::parallel_for, 32K elements, large enough to
// amortize the per-chunk bookkeeping (the step's scalars, seven slot pointers) and small enough to
// balance over the threads and keep a chunk's streams in L2; on a GPU (csrc/cuda/plan.h kChunk,
// triton_kernels/multi_tensor.py CHUNK) one thread block or program takes a chunk, 16K elements
// (16 vector iterations of 256 threads), so that a grid of a few blocks per SM has enough chunks
// to balance even for one large tensor. The update is elementwise, so its results do not depend
// on the chunk size; a norm's partials are per chunk, combined in chunk order, so a norm's rounding
// does (each backend's is deterministic for its own chunking).
constexpr int64_t kChunkElems = 32 * 1024;

struct Chunk {
  int64_t tensor;  // index into the tensor lists
  int64_t begin;   // element range [begin, end) inside that tensor (64-bit: tensors may exceed 2^31)
  int64_t end;
};


// One update over a plan's (or an op's) tensors, checked by the caller: every slot of a tensor
// walks its memory alike (Note [dense tensors, any layout], multi_tensor.h), slot dtypes as
// dispatch_storage (fastopt/dispatch.h) accepts them.
struct UpdateArgs {
  void* const* const* ptrs;  // ptrs[slot][tensor]; nullptr for an absent slot
  const Chunk* chunks;
  int64_t n_chunks;
  const double* steps;        // per tensor, after this step's increment (0 for a tensor without a grad)
  c10::ScalarType grad_dtype;  // the grads' storage; params and state are that or float32 (master)
  bool master;
  LrValue lr;
  GradPrep<double> prep;  // (1, +inf, 1, +-1) when nothing is done to the grads but maximize
  // per tensor, the seed of its stochastic stores (Note [stochastic state], fastopt/update_math.h),
  // nullptr without one
  const int64_t* seeds = nullptr;
  bool stochastic_state = false;  // the state slots are bfloat16, stored stochastically; else the params' type
  // how float16/bfloat16 params without masters are stored (Note [param store]); kKahan: the
  // compensation buffers are the params_out slot (`master` is then false)
  ParamStore store = ParamStore::kNearest;
};

// The norm pass over a plan's grads (Note [deterministic norm], multi_tensor_norm.cpp): one partial
// per chunk, combined by the caller in chunk order.
struct NormPartial {
  double value = 0.0;  // sum of squares (L2) or max |g| (inf)
  int64_t nans = 0;    // NaN count, so that the inf-norm propagates NaN as torch does
};
struct NormArgs {
  void* const* ptrs;  // per tensor; no_grad_address() skips a tensor
  const Chunk* chunks;
  int64_t n_chunks;
  c10::ScalarType dtype;
  bool l2;
  double inv_scale, clip;  // clip: +inf when off
};

// BatchNorm+ReLU, as csrc/cpu/batch_norm_relu.cpp splits it: per-channel sums (statistics forward,
// gradient sums backward) and the elementwise passes; T is float (double for double inputs).
struct BnShape {
  int64_t n, c, s;
  bool channels_last;
};
struct BnArgs {
  const void* x;
  const void* dy;          // backward only
  void* out;               // y (forward) or dx (backward)
  c10::ScalarType dtype;   // of x, dy, y, dx
  BnShape shape;
  // per channel, in T: the shift k of the statistics sums (Note [shifted sums]), the mean, the
  // affine scale and shift (z = x * scale + shift), and the dx coefficients
  const void *k, *mean, *scale, *shift, *k_g, *k_c, *k_0;
  double* sum_a;  // per channel: the two sums a sums pass returns
  double* sum_b;
  int threads;      // at::get_num_threads() of the caller
  double* scratch;  // bn_scratch_doubles(shape, threads) doubles, for a sums pass
};
// A channels_last sums pass splits its rows into at most this many chunks (its order is fixed by
// the shape and the thread count, so results are reproducible).
inline int64_t bn_max_chunks(int threads) { return 4 * static_cast<int64_t>(threads); }
// Its scratch: per chunk, the chunk's partial sums (2 * c doubles) and its float accumulators (2 * c).
inline int64_t bn_scratch_doubles(const BnShape& sh, int threads) { return bn_max_chunks(threads) * 4 * sh.c; }

// The kernels of one capability, declared once for every namespace that has them: update() once
// per rule (overloaded on the rule's Hyper), then the norm and BatchNorm+ReLU kernels.
#define FASTOPT_CPU_UPDATE_DECLARE(R) void update(const UpdateArgs& u, const R::Hyper& h);
#define FASTOPT_CPU_KERNELS_DECLARE                                                                   \
  FASTOPT_RULES(FASTOPT_CPU_UPDATE_DECLARE)                                                             \
  void norm_partials(const NormArgs& n, NormPartial* partials);                                       \
  void bn_moment_sums(const BnArgs& b);   /* sum(x - k), sum((x - k)^2) */                            \
  void bn_apply(const BnArgs& b);         /* y = relu(x * scale + shift) */                           \
  void bn_grad_sums(const BnArgs& b);     /* sum(g), sum(g * (x - mean)), g = dy * (z > 0) */          \
  void bn_input_grad(const BnArgs& b);    /* dx = k_g * g + k_c * (x - mean) + k_0 */

namespace DEFAULT {
FASTOPT_CPU_KERNELS_DECLARE
}
#if defined(__x86_64__) || defined(_M_X64)
#define FASTOPT_CPU_X86 1
namespace AVX2 {
FASTOPT_CPU_KERNELS_DECLARE
}
namespace AVX512 {
FASTOPT_CPU_KERNELS_DECLARE
}
#endif

}  // namespace cpu
}  // namespace fastopt
