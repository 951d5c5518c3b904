// The CPU multi-tensor engine's host side: work over all tensors of a group is split into
// fixed-size chunks of the whole group (not tensor by tensor), so 2,000 small tensors cost about
// what one tensor of the same total size costs; the kernels that walk the chunks are kernels.h's.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "fastopt/grad_binding.h"
#include "fastopt/update_op.h"
#include "kernels.h"

namespace fastopt {
namespace cpu {

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

// The tensor lists of one update op ("slots": params, grads, exp_avgs, ...), aligned by index,
// with their data pointers, the element counts and the chunk table.
//
// Note [dense tensors, any layout]: an elementwise update may walk raw memory linearly when every
// tensor of an index is non-overlapping and dense with the same strides (a transposed param and
// its state, say). Otherwise that index works on contiguous copies, written back by finish(): a
// correct path for any layout, never a wrong result.
class Slots {
 public:
  Slots(const Slots&) = delete;  // slot_table_ points into this object's vectors
  Slots& operator=(const Slots&) = delete;
  // `rounding`: how the results are stored (fastopt/update_op.h; its seeds one per param, or none).
  Slots(const std::vector<std::pair<const char*, at::TensorList>>& lists, std::vector<bool> written,
        at::TensorList steps, Rounding rounding = {})
      : work_(lists.size()), ptrs_(lists.size()), written_(std::move(written)), rounding_(std::move(rounding)) {
    const int64_t n = static_cast<int64_t>(lists.front().second.size());
    const std::vector<int64_t>& seeds_ = rounding_.seeds;
    TORCH_CHECK(static_cast<int64_t>(steps.size()) == n, "fastopt: one step count per param");
    TORCH_CHECK(seeds_.empty() || static_cast<int64_t>(seeds_.size()) == n, "fastopt: ", seeds_.size(),
                " seeds for ", n, " params (one per param, or none)");
    for (size_t s = 0; s < lists.size(); ++s) {
      const auto& list = lists[s].second;
      TORCH_CHECK(list.empty() || static_cast<int64_t>(list.size()) == n, "fastopt: `",
                  lists[s].first, "` has ", list.size(), " tensors, `", lists[0].first, "` has ", n);
      work_[s].assign(list.begin(), list.end());
      // every tensor of a slot has one dtype: the kernels read the whole slot as that type
      dtypes_.push_back(list.empty() ? at::kFloat : list.front().scalar_type());
      for (size_t i = 0; i < list.size(); ++i) {
        TORCH_CHECK(list[i].scalar_type() == dtypes_.back(), "fastopt (cpu): `", lists[s].first, "` tensor ", i,
                    " is ", list[i].scalar_type(), ", tensor 0 is ", dtypes_.back(), " (one dtype per list)");
      }
    }
    {
      std::vector<std::string> names;
      std::vector<bool> present;
      for (const auto& [name, list] : lists) {
        names.emplace_back(name);
        present.push_back(!list.empty());
      }
      check_slot_dtypes(names, dtypes_, present, "cpu", rounding_.stochastic_state);
    }
    numels_.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& ref = work_[0][i];
      bool linear = true, same_shape = true;
      for (size_t s = 0; s < work_.size(); ++s) {
        if (work_[s].empty()) continue;
        const at::Tensor& t = work_[s][i];
        check_plain(t, "fastopt (cpu)", lists[s].first, i);
        TORCH_CHECK(t.device().is_cpu(), "fastopt (cpu): `", lists[s].first, "` tensor ", i, " is on ",
                    t.device());
        TORCH_CHECK(t.layout() == at::kStrided, "fastopt (cpu): `", lists[s].first, "` tensor ", i,
                    " is not a dense tensor");
        TORCH_CHECK(t.numel() == ref.numel(), "fastopt: `", lists[s].first, "` tensor ", i, " has ",
                    t.numel(), " elements, `", lists[0].first, "` tensor ", i, " has ", ref.numel());
        linear = linear && walks_like(t, ref);  // fastopt/grad_binding.h
        same_shape = same_shape && same_dims(t.sizes(), ref.sizes());
      }
      if (!linear) {
        // every tensor of the index walks like the param when the param is dense (so that an
        // element's index is its position in the param's memory: Note [stochastic state]), else
        // all are made contiguous
        const bool like_ref = same_shape && ref.is_non_overlapping_and_dense();
        for (size_t s = 0; s < work_.size(); ++s) {
          if (work_[s].empty()) continue;
          const at::Tensor& t = work_[s][i];
          at::Tensor c = !like_ref ? t.contiguous()
                         : walks_like(t, ref) ? t
                         : at::empty_strided(ref.sizes(), ref.strides(), t.options()).copy_(t);
          if (written_[s] && !c.is_same(work_[s][i])) copy_back_.emplace_back(work_[s][i], c);
          work_[s][i] = c;
        }
      }
      numels_[i] = ref.numel();
    }
    for (size_t s = 0; s < work_.size(); ++s) {
      for (const auto& t : work_[s]) ptrs_[s].push_back(t.data_ptr());
      slot_table_.push_back(ptrs_[s].empty() ? nullptr : ptrs_[s].data());
    }
    for (const auto& st : steps) {
      check_plain(st, "fastopt (cpu)", "steps", step_ptrs_.size());
      TORCH_CHECK(st.numel() == 1 && st.scalar_type() == at::kFloat && st.device().is_cpu(),
                  "fastopt: step counts must be 1-element float32 CPU tensors");
      steps_.push_back(st);
      step_ptrs_.push_back(st.data_ptr<float>());
    }
    chunks_ = make_chunks(numels_);
    // Note [adjacent tensors, one range]: tensor i may continue tensor i - 1's range when every
    // slot but the grads (bound each step) begins where i - 1's ends
    joins_.assign(n, 0);
    for (int64_t i = 1; i < n && rounding_.seeds.empty() && copy_back_.empty(); ++i) {
      bool next = numels_[i - 1] > 0 && numels_[i] > 0;
      for (size_t s = 0; s < work_.size() && next; ++s) {
        if (s == kGradSlot || work_[s].empty()) continue;
        next = follows(s, i);
      }
      joins_[i] = next;
      any_join_ = any_join_ || next;
    }
  }

  // The owners (the user's parameters, whose .grad() each step reads), for bind_grads(). The
  // plan's own tensors must walk linearly (the caller plans only such params): a plan whose
  // indices were copied cannot be bound.
  void set_owners(std::vector<at::Tensor> owners) {
    TORCH_CHECK(owners.size() == numels_.size(), "fastopt: one owner per param");
    TORCH_CHECK(copy_back_.empty(), "fastopt (cpu): a planned param is laid out unlike its state");
    binder_ = GradBinder(std::move(owners), work_[kGradSlot]);
    for (size_t s = 0; s < work_.size(); ++s) {  // Note [state moved in place]
      for (size_t i = 0; i < work_[s].size() && s != kGradSlot; ++i) binder_.watch(work_[s][i], i);
    }
    for (size_t i = 0; i < steps_.size(); ++i) binder_.watch(steps_[i], i);
  }

  // An eager step reads every owner's .grad() here instead of building a Python list (Note
  // [binding grads in C++], fastopt/grad_binding.h, says what each grad becomes). Stale (nothing
  // bound) when an owner changed since the plan was built.
  BindResult bind_grads(const GivenGrads* given = nullptr) {
    TORCH_CHECK(binder_.has_owners() || numels_.empty(), "fastopt (cpu): this plan has no owners to bind");
    return binder_.bind(work_[kGradSlot], ptrs_[kGradSlot].data(), "cpu", given);
  }

  // After the step (Note [grads held only for the step]); the addresses stay for the next bind.
  void release_grads() { fastopt::release_grads(work_[kGradSlot]); }

  // Whether tensor i takes part in this step (Note [absent grads]).
  bool active(int64_t i) const { return ptrs_[kGradSlot][i] != no_grad_address(); }

  // Increments the step count of every active tensor and returns the new values.
  std::vector<double> increment_steps() const {
    std::vector<double> out(step_ptrs_.size());
    for (size_t i = 0; i < step_ptrs_.size(); ++i) {
      out[i] = active(static_cast<int64_t>(i)) ? (*step_ptrs_[i] += 1.0f) : 0.0;
    }
    return out;
  }

  // What the update kernels read (kernels.h): `steps` from increment_steps(), `prep` from
  // GradArgs::prep() (fastopt/update_op.h).
  UpdateArgs update_args(const std::vector<double>& steps, const LrValue& lr, const GradPrep<double>& prep) const {
    const std::vector<Chunk>& chunks = ranges(steps);
    return UpdateArgs{slot_table_.data(), chunks.data(), static_cast<int64_t>(chunks.size()), steps.data(),
                      dtypes_[kGradSlot], master(), lr, prep,
                      rounding_.seeds.empty() ? nullptr : rounding_.seeds.data(), rounding_.stochastic_state,
                      rounding_.param};
  }

  const Rounding& rounding() const { return rounding_; }
  // params_out holds the rounded params of float32 masters (not the compensation buffers of kKahan)
  bool master() const { return present(work_.size() - 1) && rounding_.param == ParamStore::kNearest; }

  at::ScalarType dtype(size_t slot) const { return dtypes_[slot]; }
  bool present(size_t slot) const { return !work_[slot].empty(); }
  int64_t size() const { return static_cast<int64_t>(numels_.size()); }
  const std::vector<Chunk>& chunks() const { return chunks_; }

  const std::vector<void*>& ptrs(size_t slot) const { return ptrs_[slot]; }

  // Copies the results of the non-linear indices back into the caller's tensors.
  void finish() {
    for (auto& [dst, src] : copy_back_) dst.copy_(src);
  }

  // How many chunks the last update walked (the tests see a merge through it).
  int64_t update_chunks() const { return static_cast<int64_t>((any_join_ ? merged_ : chunks_).size()); }

 private:
  // Slot s of tensor i begins where tensor i - 1's ends.
  bool follows(size_t s, int64_t i) const {
    const auto* prev = static_cast<const char*>(ptrs_[s][i - 1]);
    return prev + numels_[i - 1] * static_cast<int64_t>(c10::elementSize(dtypes_[s])) == ptrs_[s][i];
  }

  // Note [adjacent tensors, one range]: the update's chunks. Params, grads and state that lie back
  // to back in every slot (views of one buffer: a flat model, DDP's gradient_as_bucket_view, the
  // state buffer of fastopt/optim/_state_buffer.py) with equal step counts are one range, cut into
  // chunks as one tensor is: thousands of small tensors cost what one tensor of their size does,
  // not a chunk (its pointers, its step's scalars) each. Tensor i continues i - 1's range when its
  // fixed slots do (joins_, from the plan) and this step's grads and step counts do; the chunks are
  // rebuilt when that changes. The update is elementwise, so its results do not depend on the
  // ranges (bit for bit); tensors with seeds (Note [stochastic state]: an element's bits are keyed
  // by its index in its own tensor) are never joined, and the norms keep the per-tensor chunks
  // (their partial sums would round otherwise).
  const std::vector<Chunk>& ranges(const std::vector<double>& steps) const {
    if (!any_join_) return chunks_;
    const int64_t n = size();
    // one pass, per step, over what the joins read (this step's grads and step counts)
    const void* absent = no_grad_address();
    void* const* grads = ptrs_[kGradSlot].data();
    const int64_t grad_bytes = static_cast<int64_t>(c10::elementSize(dtypes_[kGradSlot]));
    bool changed = merged_.empty();
    merged_joins_.resize(n, 0);
    for (int64_t i = 1; i < n; ++i) {
      const uint8_t join = joins_[i] && grads[i - 1] != absent && grads[i] != absent && steps[i] == steps[i - 1] &&
                           static_cast<const char*>(grads[i - 1]) + numels_[i - 1] * grad_bytes == grads[i];
      changed = changed || join != merged_joins_[i];
      merged_joins_[i] = join;
    }
    if (changed) {
      merged_.clear();
      for (int64_t t = 0; t < n;) {
        int64_t total = numels_[t], u = t + 1;
        for (; u < n && merged_joins_[u]; ++u) total += numels_[u];
        for (int64_t b = 0; b < total; b += kChunkElems) merged_.push_back({t, b, std::min(total, b + kChunkElems)});
        t = u;
      }
    }
    return merged_;
  }

  GradBinder binder_;
  std::vector<std::vector<at::Tensor>> work_;
  std::vector<std::vector<void*>> ptrs_;
  std::vector<void* const*> slot_table_;  // ptrs_[s].data(), nullptr for an empty slot
  std::vector<at::ScalarType> dtypes_;
  std::vector<bool> written_;
  Rounding rounding_;
  std::vector<int64_t> numels_;
  std::vector<Chunk> chunks_;
  std::vector<uint8_t> joins_;  // Note [adjacent tensors, one range]: the plan's part
  bool any_join_ = false;
  mutable std::vector<uint8_t> merged_joins_;  // the merged_ chunks' (this step's)
  mutable std::vector<Chunk> merged_;
  std::vector<at::Tensor> steps_;
  std::vector<float*> step_ptrs_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back_;
};

}  // namespace cpu
}  // namespace fastopt
