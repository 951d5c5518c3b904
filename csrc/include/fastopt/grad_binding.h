// Binding a step's gradients into a cached plan, shared by the CPU (Slots) and CUDA (CudaPlan)
// plans. See Note [the plan life cycle] (fastopt/_plan.py) for the whole protocol.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fastopt/tensor_checks.h"

namespace fastopt {

// Note [absent grads]: a planned param without a grad this step keeps its place in the plan; its
// grad address is kNoGrad and the kernels skip it (no update, no step count), as torch.optim skips
// a param whose .grad is None. Not 0: an empty tensor's address may be 0.
#ifdef __CUDACC__
__host__ __device__
#endif
inline void* no_grad_address() { return reinterpret_cast<void*>(~uintptr_t(0)); }

// What a plan knows of one of its owners (a user's parameter) when it was built. A param given new
// storage, dtype, shape or strides (`p.data = ...`, `model.half()`) no longer matches: the plan is
// stale. Holding the storage keeps its address from being reused by a new allocation.
class OwnerRecord {
 public:
  explicit OwnerRecord(const at::Tensor& p)
      : storage_((check_plain(p, "fastopt", "owners", 0), p.storage())), offset_(p.storage_offset()), dtype_(p.scalar_type()),
        sizes_(p.sizes().vec()), strides_(p.strides().vec()) {}

  bool matches(const at::Tensor& p) const {
    return p.storage().unsafeGetStorageImpl() == storage_.unsafeGetStorageImpl() &&
           p.storage_offset() == offset_ && p.scalar_type() == dtype_ && p.sizes() == c10::IntArrayRef(sizes_) &&
           p.strides() == c10::IntArrayRef(strides_);
  }

 private:
  c10::Storage storage_;
  int64_t offset_;
  at::ScalarType dtype_;
  std::vector<int64_t> sizes_, strides_;
};

// Non-overlapping and dense with the same sizes and strides as `ref`: one block of memory walked
// in the same order (Note [dense tensors, any layout], csrc/cpu/multi_tensor.h).
inline bool walks_like(const at::Tensor& t, const at::Tensor& ref) {
  return t.layout() == at::kStrided && t.sizes() == ref.sizes() && t.strides() == ref.strides() &&
         t.is_non_overlapping_and_dense();
}

enum class Bound { kGrad, kRelaid, kNoGrad, kStale };

// The grad of `owner` as the plan's kernels take it: laid out like `tmpl` (the tensor the plan was
// built with in the grads slot: the param in its storage dtype, a real view for complex params).
// A dense grad of another layout is copied into `tmpl`'s layout (Bound::kRelaid: the kernels still
// run, the plan stays). A sparse grad makes the plan stale (the optimizer re-plans: Adagrad's
// sparse path, or torch's error). A grad the kernels must not read raises torch's kind of error,
// before anything was written: another dtype, shape or device.
inline std::pair<Bound, at::Tensor> bind_grad(at::Tensor g, const at::Tensor& tmpl, size_t index,
                                              const char* backend) {
  if (!g.defined()) return {Bound::kNoGrad, at::Tensor()};
  // a sparse grad, or one of a tensor subclass (a DTensor): the optimizer re-plans and sends the
  // param to the path that takes it (Adagrad's sparse step, the reference rules) or raises
  if (g.layout() != at::kStrided || !is_plain(g)) return {Bound::kStale, at::Tensor()};
  if (g.is_complex()) g = at::view_as_real(g);
  TORCH_CHECK(g.scalar_type() == tmpl.scalar_type(), "fastopt (", backend, "): expected the grad of param ", index,
              " to have dtype ", tmpl.scalar_type(), " (the param's), but got ", g.scalar_type());
  TORCH_CHECK(g.device() == tmpl.device(), "fastopt (", backend, "): expected the grad of param ", index,
              " on ", tmpl.device(), " (the param's device), but got ", g.device());
  TORCH_CHECK(g.sizes() == tmpl.sizes(), "fastopt (", backend, "): the grad of param ", index, " has shape ",
              g.sizes(), ", the param ", tmpl.sizes());
  if (walks_like(g, tmpl)) return {Bound::kGrad, g};
  return {Bound::kRelaid, at::empty_like(tmpl).copy_(g)};
}

// How a plan's binding went: `stale` (an owner changed: rebuild the plan, nothing was bound),
// else how many params got their grad as it is, copied into the plan's layout, or none.
struct BindResult {
  bool stale = false;
  int64_t bound = 0, relaid = 0, no_grad = 0;
};

// The dtypes of an update op's slots, in the order every op lists them: params (slot 0), grads
// (slot 1), state..., params_out (last). The kernels read every state slot as the params' type and
// write params_out as the grads' type, so a mismatch (a param whose dtype changed after its state
// was made, say) must be refused here: it would read and write out of bounds. Each slot is one
// dtype (checked by the caller); an empty slot is absent.
inline void check_slot_dtypes(const std::vector<std::string>& names, const std::vector<at::ScalarType>& dtypes,
                              const std::vector<bool>& present, const char* backend) {
  if (dtypes.size() < 3) return;
  for (size_t s = 2; s < dtypes.size(); ++s) {
    if (!present[s]) continue;
    const bool is_out = s + 1 == dtypes.size();
    const size_t like = is_out ? 1 : 0;
    TORCH_CHECK(dtypes[s] == dtypes[like], "fastopt (", backend, "): `", names[s], "` is ", dtypes[s], ", `",
                names[like], "` ", dtypes[like], is_out ? "" : " (the state has the params' dtype: was a param's dtype "
                "changed after its state was made?)");
  }
}

// The owners and grads of a step given by the caller instead of read from the plan's owners: the
// local shards of DTensor params and of their grads (Note [DTensor shards], fastopt/_plan.py).
// An absent grad is an undefined tensor.
struct GivenGrads {
  std::vector<at::Tensor> owners, grads;
};

// Binds the grads of every owner: `grads[i]` gets the tensor to read (undefined without a grad).
// Validates every grad before it returns anything (a bad grad raises with nothing bound).
inline BindResult bind_grads(const std::vector<at::Tensor>& owners, const std::vector<OwnerRecord>& records,
                             const std::vector<at::Tensor>& templates, std::vector<at::Tensor>& grads,
                             const char* backend, const GivenGrads* given = nullptr) {
  const std::vector<at::Tensor>& now = given != nullptr ? given->owners : owners;
  TORCH_CHECK(now.size() == records.size() && (given == nullptr || given->grads.size() == records.size()),
              "fastopt (", backend, "): expected ", records.size(), " owners and grads to bind");
  BindResult r;
  for (size_t i = 0; i < now.size(); ++i) {
    if (!is_plain(now[i]) || !records[i].matches(now[i])) return BindResult{true};
  }
  std::vector<at::Tensor> out(now.size());
  for (size_t i = 0; i < now.size(); ++i) {
    auto [kind, g] = bind_grad(given != nullptr ? given->grads[i] : now[i].grad(), templates[i], i, backend);
    if (kind == Bound::kStale) return BindResult{true};
    r.bound += kind == Bound::kGrad;
    r.relaid += kind == Bound::kRelaid;
    r.no_grad += kind == Bound::kNoGrad;
    out[i] = std::move(g);
  }
  grads = std::move(out);
  return r;
}

}  // namespace fastopt
