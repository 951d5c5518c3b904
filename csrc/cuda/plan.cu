// CudaPlan: the device tables of a param group (Note [CUDA tables in device memory]).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "plan.h"

namespace fastopt {
namespace cuda {

namespace {

// A host vector to the device without a host sync: staged through pinned memory (the caching host
// allocator keeps the buffer alive until the copy has run).
template <typename V>
at::Tensor upload(const std::vector<V>& values, at::ScalarType dtype, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(std::max<size_t>(values.size(), 1))},
                              at::TensorOptions().dtype(dtype).pinned_memory(true));
  if (!values.empty()) std::memcpy(host.data_ptr(), values.data(), values.size() * sizeof(V));
  return host.to(device, /*non_blocking=*/true);
}

}  // namespace

// Note [aligned from the addresses]: vector loads of 4 elements need every slot's address aligned
// to 4 elements of its dtype, so tensor i's flag is read from the address table as uploaded, not
// from the tensors: a grad that shares its storage with the grad held before it is bound by its
// address alone (Note [one hold per grad storage], grad_binding.h), and a view of a flat grad
// buffer (DDP's bucket views) may begin anywhere. An absent grad is never read.
std::vector<uint8_t> CudaPlan::alignment() const {
  const size_t n = numels_.size();
  std::vector<uint8_t> aligned(n, 1);
  for (size_t s = 0; s < slots_.size(); ++s) {
    if (!present_[s]) continue;
    const uintptr_t unit = 4 * c10::elementSize(dtypes_[s]);
    for (size_t i = 0; i < n; ++i) {
      const auto address = static_cast<uintptr_t>(ptr_host_[s * n + i]);
      if (s == kGradSlot && address == reinterpret_cast<uintptr_t>(no_grad_address())) continue;
      aligned[i] = aligned[i] && address % unit == 0;
    }
  }
  return aligned;
}

CudaPlan::CudaPlan(const std::vector<std::pair<const char*, std::vector<at::Tensor>>>& lists,
                   std::vector<at::Tensor> steps, std::vector<at::Tensor> owners, Rounding rounding)
    : device_(lists.front().second.empty() ? at::Device(at::kCUDA) : lists.front().second.front().device()),
      steps_(std::move(steps)),
      rounding_(std::move(rounding)) {
  const auto& first = lists.front().second;
  const size_t n = first.size();
  TORCH_CHECK(steps_.size() == n, "fastopt (cuda): one step count per param, got ", steps_.size(), " for ", n);
  TORCH_CHECK(owners.empty() || owners.size() == n, "fastopt (cuda): one owner per param");
  TORCH_CHECK(rounding_.seeds.empty() || rounding_.seeds.size() == n, "fastopt (cuda): ", rounding_.seeds.size(),
              " seeds for ", n, " params (one per param, or none)");
  for (const auto& [name, tensors] : lists) {
    TORCH_CHECK(tensors.empty() || tensors.size() == n, "fastopt (cuda): `", name, "` has ", tensors.size(),
                " tensors, expected ", n);
    present_.push_back(!tensors.empty());
    dtypes_.push_back(tensors.empty() ? at::kFloat : tensors.front().scalar_type());
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      check_plain(t, "fastopt (cuda)", name, i);
      TORCH_CHECK(t.is_cuda() && t.device() == device_, "fastopt (cuda): `", name, "` tensor ", i, " is on ",
                  t.device(), ", the params on ", device_);
      TORCH_CHECK(t.scalar_type() == dtypes_.back(), "fastopt (cuda): `", name, "` mixes ", dtypes_.back(),
                  " and ", t.scalar_type());
      TORCH_CHECK(walks_like(t, first[i]), "fastopt (cuda): `", name, "` tensor ", i,
                  " is not laid out like its param (dense, same strides)");
    }
    slots_.push_back(tensors);
  }
  {
    std::vector<std::string> names;
    for (const auto& entry : lists) names.emplace_back(entry.first);
    check_slot_dtypes(names, dtypes_, present_, "cuda", rounding_.stochastic_state);
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& s = steps_[i];
    check_plain(s, "fastopt (cuda)", "steps", i);
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == device_,
                "fastopt (cuda): step counts must be 1-element float32 tensors on ", device_);
  }
  std::vector<int32_t> chunk_tensor;
  std::vector<int64_t> chunk_start;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = first[i].numel();
    numels_.push_back(numel);
    const int64_t count = std::max<int64_t>(1, (numel + kChunk - 1) / kChunk);  // empty tensors too
    for (int64_t c = 0; c < count; ++c) {
      chunk_tensor.push_back(static_cast<int32_t>(i));
      chunk_start.push_back(c * kChunk);
    }
  }
  n_chunks_ = static_cast<int64_t>(chunk_tensor.size());
  if (!owners.empty()) {
    binder_ = GradBinder(std::move(owners), slots_[kGradSlot]);
    for (size_t s = 0; s < slots_.size(); ++s) {  // Note [state moved in place]
      for (size_t i = 0; i < slots_[s].size() && s != kGradSlot; ++i) binder_.watch(slots_[s][i], i);
    }
    for (size_t i = 0; i < n; ++i) binder_.watch(steps_[i], i);
  }
  ptr_host_.assign(slots_.size() * n, 0);
  bound_addresses_.assign(n, nullptr);
  for (size_t s = 0; s < slots_.size(); ++s) {
    for (size_t i = 0; i < slots_[s].size(); ++i) ptr_host_[s * n + i] = reinterpret_cast<int64_t>(slots_[s][i].data_ptr());
  }
  aligned_host_ = alignment();
  {  // Note [ranges on the GPU]: the fixed slots are every present one but the grads
    std::vector<std::pair<const int64_t*, int64_t>> fixed;
    for (size_t s = 0; s < slots_.size(); ++s) {
      if (s != kGradSlot && present_[s]) fixed.emplace_back(ptr_host_.data() + s * n, c10::elementSize(dtypes_[s]));
    }
    ranges_ = RangeTable(numels_, fixed, c10::elementSize(dtypes_[kGradSlot]), rounding_.seeds.empty(), kChunk);
  }
  std::vector<int64_t> step_ptrs;
  for (const auto& s : steps_) step_ptrs.push_back(reinterpret_cast<int64_t>(s.data_ptr()));
  chunk_tensor_ = upload(chunk_tensor, at::kInt, device_);
  chunk_start_ = upload(chunk_start, at::kLong, device_);
  numels_dev_ = upload(numels_, at::kLong, device_);
  ptrs_dev_ = upload(ptr_host_, at::kLong, device_);
  aligned_dev_ = upload(aligned_host_, at::kByte, device_);
  step_ptrs_dev_ = upload(step_ptrs, at::kLong, device_);
  range_dev_ = upload(ranges_.table(), at::kLong, device_);
  seeds_dev_ = upload(rounding_.seeds, at::kLong, device_);
  const auto on_device = at::TensorOptions().device(device_);
  done_ = at::zeros({static_cast<int64_t>(std::max<size_t>(n, 1))}, on_device.dtype(at::kInt));
  partials_ = at::empty({std::max<int64_t>(n_chunks_, 1)}, on_device.dtype(at::kDouble));
  norm_counter_ = at::zeros({1}, on_device.dtype(at::kInt));
}

// The grads row of the address table, as bind_grads() wrote it into `bound_addresses_` (the grads
// bound in slots_[kGradSlot] until the step's launch, Note [grads held only for the step]):
// uploaded only when an address changed.
void CudaPlan::upload_grads() {
  const size_t n = numels_.size();
  int64_t* row = ptr_host_.data() + kGradSlot * n;
  bool changed = false;
  for (size_t i = 0; i < n; ++i) {
    const int64_t address = reinterpret_cast<int64_t>(bound_addresses_[i]);
    changed = changed || address != row[i];
    row[i] = address;
  }
  if (!changed) return;
  // Only the grads row of the address table, the alignment flags and the range table change.
  const std::vector<uint8_t> aligned = alignment();
  ptrs_dev_.narrow(0, static_cast<int64_t>(kGradSlot * n), static_cast<int64_t>(n))
      .copy_(upload(std::vector<int64_t>(row, row + n), at::kLong, device_), /*non_blocking=*/true);
  if (aligned != aligned_host_) {
    aligned_dev_.copy_(upload(aligned, at::kByte, device_), /*non_blocking=*/true);
    aligned_host_ = aligned;
  }
  if (ranges_.update(row)) range_dev_.copy_(upload(ranges_.table(), at::kLong, device_), /*non_blocking=*/true);
}

BindResult CudaPlan::bind_grads(const GivenGrads* given) {
  TORCH_CHECK(binder_.has_owners() || numels_.empty(), "fastopt (cuda): this plan has no owners to bind");
  const BindResult r = binder_.bind(slots_[kGradSlot], bound_addresses_.data(), "cuda", given);
  if (!r.stale) upload_grads();
  return r;
}

}  // namespace cuda
}  // namespace fastopt
