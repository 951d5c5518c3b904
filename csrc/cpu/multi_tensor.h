// The CPU multi-tensor engine: work over all tensors of a group is split into fixed-size chunks
// of the whole group (not tensor by tensor), so 2,000 small tensors cost about what one tensor of
// the same total size costs.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fastopt {
namespace cpu {

// Note [chunk size]: 32K elements is large enough to amortize the per-chunk bookkeeping and
// small enough to balance across threads and stay in L2.
constexpr int64_t kChunkElems = 32 * 1024;

struct Chunk {
  int64_t tensor;  // index into the tensor list
  int64_t begin;   // element range [begin, end) inside that tensor (64-bit: tensors may exceed 2^31)
  int64_t end;
};

inline std::vector<Chunk> make_chunks(at::TensorList tensors, int64_t chunk = kChunkElems) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += chunk) {
      chunks.push_back({t, b, std::min(n, b + chunk)});
    }
  }
  return chunks;
}

// Runs fn(chunk_index, chunk) for every chunk, in parallel over at::get_num_threads() threads.
template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) fn(i, chunks[i]);
  });
}

}  // namespace cpu
}  // namespace fastopt
