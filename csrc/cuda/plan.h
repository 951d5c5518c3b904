// The host side of the CUDA multi-tensor engine (no CUDA types here: csrc/bindings/plans.cpp includes it).
//
// Note [CUDA tables in device memory]: torch's multi_tensor_apply packs tensor addresses into the
// 4 KB kernel-argument buffer and so launches once every ~36 tensors. A CudaPlan keeps the
// per-group metadata in device memory instead, built once: per-slot address tables, element
// counts, the chunk table (tensor index, 64-bit start; the norm's), the update's range table (Note
// [ranges on the GPU], fastopt/range_table.h), per-tensor step-count addresses, and the counters
// of Note [one-launch step counts] (triton_kernels/multi_tensor.py, the same protocol). A step
// re-uploads only the grad addresses, and only when a grad was reallocated (the range table too
// when that changes which grads lie back to back); the kernels
// run a persistent grid sized to the GPU that walks the chunk table, so one launch updates every
// tensor of a group however many there are.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "fastopt/grad_binding.h"
#include "fastopt/range_table.h"
#include "fastopt/update_op.h"

namespace fastopt {
namespace cuda {

constexpr int64_t kChunk = 16384;  // elements per chunk, a block's unit of work (Note [chunk size], csrc/cpu/kernels.h)

class CudaPlan {
 public:
  // `lists`: slot name and tensors, aligned by index; an empty list is an absent slot. Slot 0 is
  // the params the math runs on, slot kGradSlot the grads (re-bound every step). `owners`:
  // the user's params, whose .grad() bind_grads() reads (may be empty for a one-off plan).
  // `rounding`: how the results are stored (fastopt/update_op.h; its seeds one per param, or none).
  CudaPlan(const std::vector<std::pair<const char*, std::vector<at::Tensor>>>& lists, std::vector<at::Tensor> steps,
           std::vector<at::Tensor> owners, Rounding rounding = {});

  // Reads every owner's .grad() (fastopt/grad_binding.h: a grad of another layout is relaid, a
  // missing one skipped, Note [absent grads]); stale, binding nothing, when an owner changed.
  BindResult bind_grads(const GivenGrads* given = nullptr);

  // After the step's launch (Note [grads held only for the step]); the uploaded addresses stay.
  void release_grads() { fastopt::release_grads(slots_[kGradSlot]); }

  int64_t size() const { return static_cast<int64_t>(numels_.size()); }
  int64_t n_chunks() const { return n_chunks_; }  // per tensor: the norm's
  int64_t update_chunks() const { return ranges_.n_chunks(); }  // Note [ranges on the GPU]: the update's
  at::ScalarType dtype(size_t slot) const { return dtypes_[slot]; }
  bool present(size_t slot) const { return present_[slot]; }
  const at::Device& device() const { return device_; }
  const Rounding& rounding() const { return rounding_; }
  // params_out holds the rounded params of float32 masters (not compensation buffers)
  bool master() const { return present_.back() && rounding_.param == ParamStore::kNearest; }

  // Device addresses for the kernels.
  const int32_t* chunk_tensor() const { return chunk_tensor_.data_ptr<int32_t>(); }
  const int64_t* chunk_start() const { return chunk_start_.data_ptr<int64_t>(); }
  const int64_t* numels() const { return numels_dev_.data_ptr<int64_t>(); }
  void* const* ptrs() const { return static_cast<void* const*>(ptrs_dev_.data_ptr()); }  // [slot][tensor]
  const uint8_t* aligned() const { return aligned_dev_.data_ptr<uint8_t>(); }
  float* const* steps() const { return static_cast<float* const*>(step_ptrs_dev_.data_ptr()); }
  const int64_t* range_chunks() const { return range_dev_.data_ptr<int64_t>(); }  // RangeTable::kRow a chunk
  const int64_t* range_per_tensor() const {
    return range_dev_.data_ptr<int64_t>() + RangeTable::kRow * ranges_.capacity();
  }
  int32_t* done() const { return done_.data_ptr<int32_t>(); }
  const int64_t* seeds() const { return seeds_dev_.data_ptr<int64_t>(); }
  double* partials() const { return partials_.data_ptr<double>(); }
  int32_t* norm_counter() const { return norm_counter_.data_ptr<int32_t>(); }

 private:
  void upload_grads();
  std::vector<uint8_t> alignment() const;  // Note [aligned from the addresses] (plan.cu)

  at::Device device_;
  std::vector<std::vector<at::Tensor>> slots_;  // keeps every tensor alive while the tables hold its address
  std::vector<at::ScalarType> dtypes_;
  std::vector<bool> present_;
  std::vector<at::Tensor> steps_;
  Rounding rounding_;
  GradBinder binder_;  // the owners as the plan was built, and the layout a bound grad has
  std::vector<int64_t> numels_;
  std::vector<int64_t> ptr_host_;  // [slot][tensor] addresses, as uploaded
  std::vector<void*> bound_addresses_;  // this step's grad addresses, from bind_grads()
  std::vector<uint8_t> aligned_host_;
  int64_t n_chunks_ = 0;
  RangeTable ranges_;  // the update's chunks, rebuilt when other grads join
  at::Tensor chunk_tensor_, chunk_start_, numels_dev_, ptrs_dev_, aligned_dev_, step_ptrs_dev_, range_dev_, done_,
      partials_, norm_counter_, seeds_dev_;
};

// The learning rate: a device tensor (read by the kernel: CUDA-graph safe) or a value.
struct CudaLr {
  c10::optional<at::Tensor> tensor;
  double value = 0.0;
  bool fp32 = false;  // the value came from a float32 tensor: torch's float32 arithmetic (LrValue)
};

// One launch of rule R over the plan's tensors (their grads bound this step); the plan's lists are
// R's slots (fastopt/update_op.h). Instantiated for every rule of FASTOPT_RULES (update.cu).
template <typename R>
void step(const CudaPlan& plan, const CudaLr& lr, const typename R::Hyper& h, const GradArgs& g);

// The norm (2 or inf) of the bound grads after unscale and value clip, and, with max_norm, the
// clip coefficient, in one launch: a float32 tensor [norm, coef].
at::Tensor grad_norm(const CudaPlan& plan, double norm_type, const c10::optional<at::Tensor>& grad_scale,
                     c10::optional<double> clip_value, c10::optional<double> max_norm);

}  // namespace cuda
}  // namespace fastopt
