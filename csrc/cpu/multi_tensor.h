// The CPU multi-tensor engine: work over all tensors of a group is split into fixed-size chunks
// of the whole group (not tensor by tensor), so 2,000 small tensors cost about what one tensor of
// the same total size costs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fastopt {
namespace cpu {

// Note [chunk size]: 32K elements is large enough to amortize the per-chunk bookkeeping and
// small enough to balance across threads and stay in L2.
constexpr int64_t kChunkElems = 32 * 1024;

struct Chunk {
  int64_t tensor;  // index into the tensor lists
  int64_t begin;   // element range [begin, end) inside that tensor (64-bit: tensors may exceed 2^31)
  int64_t end;
};

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels, int64_t chunk = kChunkElems) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t b = 0; b < numels[t]; b += chunk) {
      chunks.push_back({t, b, std::min(numels[t], b + chunk)});
    }
  }
  return chunks;
}

inline std::vector<Chunk> make_chunks(at::TensorList tensors, int64_t chunk = kChunkElems) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const auto& t : tensors) numels.push_back(t.numel());
  return make_chunks(numels, chunk);
}

// Runs fn(chunk_index, chunk) for every chunk, in parallel over at::get_num_threads() threads.
template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) fn(i, chunks[i]);
  });
}

// The tensor lists of one update op ("slots": params, grads, exp_avgs, ...), aligned by index.
//
// Note [dense tensors, any layout]: an elementwise update may walk raw memory linearly when every
// tensor of an index is non-overlapping and dense with the same strides (a transposed param and
// its state, say). Otherwise that index works on contiguous copies, written back at the end: a
// correct path for any layout, never a wrong result.
class Slots {
 public:
  Slots(std::vector<std::pair<const char*, at::TensorList>> lists, std::vector<bool> written)
      : names_(), work_(lists.size()), written_(std::move(written)) {
    const int64_t n = static_cast<int64_t>(lists.front().second.size());
    for (size_t s = 0; s < lists.size(); ++s) {
      names_.push_back(lists[s].first);
      const auto& list = lists[s].second;
      TORCH_CHECK(list.empty() || static_cast<int64_t>(list.size()) == n, "fastopt: `",
                  lists[s].first, "` has ", list.size(), " tensors, `", lists[0].first, "` has ", n);
      work_[s].assign(list.begin(), list.end());
    }
    numels_.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& ref = work_[0][i];
      bool linear = ref.is_non_overlapping_and_dense();
      for (size_t s = 0; s < work_.size(); ++s) {
        if (work_[s].empty()) continue;
        const at::Tensor& t = work_[s][i];
        TORCH_CHECK(t.device().is_cpu(), "fastopt (cpu): `", names_[s], "` tensor ", i, " is on ",
                    t.device());
        TORCH_CHECK(t.numel() == ref.numel(), "fastopt: `", names_[s], "` tensor ", i, " has ",
                    t.numel(), " elements, `", names_[0], "` tensor ", i, " has ", ref.numel());
        linear = linear && t.is_non_overlapping_and_dense() && t.strides() == ref.strides();
      }
      if (!linear) {
        for (size_t s = 0; s < work_.size(); ++s) {
          if (work_[s].empty()) continue;
          at::Tensor c = work_[s][i].contiguous();
          if (written_[s] && !c.is_same(work_[s][i])) copy_back_.emplace_back(work_[s][i], c);
          work_[s][i] = c;
        }
      }
      numels_[i] = ref.numel();
    }
  }

  const at::Tensor& at(size_t slot, int64_t i) const { return work_[slot][i]; }
  bool present(size_t slot) const { return !work_[slot].empty(); }
  const std::vector<int64_t>& numels() const { return numels_; }

  template <typename scalar_t>
  scalar_t* ptr(size_t slot, int64_t i) const {
    return work_[slot].empty() ? nullptr : static_cast<scalar_t*>(work_[slot][i].data_ptr());
  }

  // Copies the results of the non-linear indices back into the caller's tensors.
  void finish() {
    for (auto& [dst, src] : copy_back_) dst.copy_(src);
  }

 private:
  std::vector<const char*> names_;
  std::vector<std::vector<at::Tensor>> work_;
  std::vector<bool> written_;
  std::vector<int64_t> numels_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back_;
};

}  // namespace cpu
}  // namespace fastopt
