// The update chunks of the GPU plans (Triton and CUDA): adjacent tensors as one range. Host code
// only, no ATen (csrc/cuda/plan.cu and the Triton plan's binding share it).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

#include "fastopt/no_grad.h"

namespace fastopt {

// Note [ranges on the GPU]: as on the CPU (Note [adjacent tensors, one range], csrc/cpu/
// multi_tensor.h), tensors whose params, grads and state lie back to back in every slot (views of
// one buffer, the state buffer) are one range, cut into chunks as one tensor is: thousands of
// small tensors cost the GPU what one tensor of their size does, not a program (its table reads,
// its step's scalars, a masked walk of a few hundred elements) each. Unlike the CPU's, the host
// cannot read the step counts (they live on the device: reading them would sync), so the ranges
// follow the addresses alone and the kernels check the counts: a chunk whose tensors all have the
// same count is walked as one tensor, with that count's scalars; any other, tensor by tensor
// (slower, the same results). The update is elementwise, so its results do not depend on the
// ranges, bit for bit; tensors with seeds (their random bits are keyed by the element's index in
// its own tensor) are never joined, and the norms keep the per-tensor chunks.
//
// The table, one int64 array: kRow values per chunk (the range's first tensor, whose addresses
// are the range's; the first and the last tensor the chunk covers; its elements [lo, hi) in the
// range), `capacity()` rows, then two per tensor (its offset in its range; how many chunks cover
// it: Note [one-launch step counts], triton_kernels/multi_tensor.py). Every tensor, empty ones
// too, is covered by at least one chunk. A chunk covers at most kMaxTensors tensors, so that a
// program checks and finishes their counts at once (one lane or thread each), not in a loop as
// long as the tensors are small (4,000 one-element tensors would be one chunk): it ends early, at
// the end of its kMaxTensors-th tensor, where it would cover more. The capacity, one chunk per
// kChunk elements of each tensor apart plus one per kMaxTensors tensors, is the most chunks any
// ranges make (a range's chunks cut at kChunk elements are at most ceil(its elements / kChunk),
// and each cut early holds kMaxTensors tensor ends); the rows past n_chunks() are unused.
class RangeTable {
 public:
  static constexpr int64_t kRow = 5;
  static constexpr int64_t kMaxTensors = 64;  // triton_kernels/multi_tensor.py: RANGE_TENSORS

  RangeTable() = default;

  // `fixed`: the slots that do not change between steps (params, state, params_out), each its
  // tensors' addresses (n of them) and its element size. Tensor i may continue i - 1's range when
  // both have elements and each fixed slot of i begins where i - 1's ends; `joinable` false (seeds)
  // joins nothing.
  RangeTable(std::vector<int64_t> numels, const std::vector<std::pair<const int64_t*, int64_t>>& fixed,
             int64_t grad_itemsize, bool joinable, int64_t chunk)
      : numels_(std::move(numels)), grad_itemsize_(grad_itemsize), chunk_(chunk) {
    const size_t n = numels_.size();
    fixed_.assign(n, 0);
    joins_.assign(n, 0);
    for (size_t i = 1; i < n && joinable; ++i) {
      bool next = numels_[i - 1] > 0 && numels_[i] > 0;
      for (const auto& [row, itemsize] : fixed) next = next && row[i - 1] + numels_[i - 1] * itemsize == row[i];
      fixed_[i] = next;
      any_fixed_ = any_fixed_ || next;
    }
    for (int64_t numel : numels_) capacity_ += std::max<int64_t>(1, (numel + chunk_ - 1) / chunk_);
    capacity_ += static_cast<int64_t>(n) / kMaxTensors;
    table_.assign(static_cast<size_t>(kRow * capacity_) + 2 * n, 0);
    build();
  }

  // This bind's grad addresses (no_grad_address() for an absent grad): tensor i joins i - 1 when
  // the fixed slots do and both grads are present and back to back. Whether the table changed.
  bool update(const int64_t* grads) {
    if (!any_fixed_) return false;
    const auto absent = reinterpret_cast<int64_t>(no_grad_address());
    bool changed = false;
    for (size_t i = 1; i < numels_.size(); ++i) {
      const uint8_t join = fixed_[i] && grads[i - 1] != absent && grads[i] != absent &&
                           grads[i - 1] + numels_[i - 1] * grad_itemsize_ == grads[i];
      changed = changed || join != joins_[i];
      joins_[i] = join;
    }
    if (changed) build();
    return changed;
  }

  const std::vector<int64_t>& table() const { return table_; }
  int64_t n_chunks() const { return n_chunks_; }
  int64_t size() const { return static_cast<int64_t>(numels_.size()); }
  int64_t capacity() const { return capacity_; }
  bool any_join() const { return any_fixed_; }

 private:
  void build() {
    const int64_t n = static_cast<int64_t>(numels_.size());
    int64_t* per_tensor = table_.data() + kRow * capacity_;
    int64_t* row = table_.data();
    for (int64_t t = 0; t < n;) {
      int64_t u = t, total = 0;
      do {  // tensors t .. u - 1 are one range
        per_tensor[2 * u] = total;
        per_tensor[2 * u + 1] = 0;
        total += numels_[u];
        ++u;
      } while (u < n && joins_[u]);
      const auto end_of = [&](int64_t k) { return per_tensor[2 * k] + numels_[k]; };
      int64_t a = t, lo = 0;
      do {  // once for an empty tensor
        int64_t hi = std::min(total, lo + chunk_);
        while (a < u - 1 && end_of(a) <= lo) ++a;  // the first tensor with an element at or after lo
        int64_t b = a;
        while (b < u - 1 && end_of(b) < hi) ++b;  // the tensor of element hi - 1
        if (b - a >= kMaxTensors) {
          b = a + kMaxTensors - 1;
          hi = end_of(b);
        }
        for (int64_t k = a; k <= b; ++k) ++per_tensor[2 * k + 1];
        if (row == table_.data() + kRow * capacity_) throw std::logic_error("fastopt: RangeTable over its capacity");
        row[0] = t, row[1] = a, row[2] = b, row[3] = lo, row[4] = hi;
        row += kRow;
        lo = hi;
      } while (lo < total);
      t = u;
    }
    n_chunks_ = (row - table_.data()) / kRow;
  }

  std::vector<int64_t> numels_;
  std::vector<uint8_t> fixed_;  // the plan's part of the joins
  std::vector<uint8_t> joins_;  // this bind's
  bool any_fixed_ = false;
  int64_t grad_itemsize_ = 0;
  int64_t chunk_ = 1;
  int64_t capacity_ = 0;
  int64_t n_chunks_ = 0;
  std::vector<int64_t> table_;
};

}  // namespace fastopt
