// Binding a step's gradients into a cached plan, shared by the CPU (Slots) and CUDA (CudaPlan)
// plans. See Note [the plan life cycle] (fastopt/_plan.py) for the whole protocol.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fastopt/no_grad.h"
#include "fastopt/tensor_checks.h"

namespace fastopt {

// Equal sizes or strides, compared inline: this runs several times per param per step, and
// ArrayRef's operator== calls memcmp (a quarter of the binding's time at 4,000 params).
inline bool same_dims(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t d = 0; d < a.size(); ++d) {
    if (a[d] != b[d]) return false;
  }
  return true;
}

// What a plan knows of one of its owners (a user's parameter) when it was built. A param given new
// storage, dtype, shape or strides (`p.data = ...`, `model.half()`) no longer matches: the plan is
// stale. Holding the storage keeps its address from being reused by a new allocation.
class OwnerRecord {
 public:
  explicit OwnerRecord(const at::Tensor& p)
      : storage_((check_plain(p, "fastopt", "owners", 0), p.storage())), offset_(p.storage_offset()), dtype_(p.scalar_type()),
        sizes_(p.sizes().vec()), strides_(p.strides().vec()) {}

  // Called for every owner on every step (Note [binding grads in C++]): no refcounted copies.
  // `p` has storage (is_plain, checked first).
  bool matches(const at::Tensor& p) const {
    const c10::TensorImpl* impl = p.unsafeGetTensorImpl();
    return impl->unsafe_storage().unsafeGetStorageImpl() == storage_.unsafeGetStorageImpl() &&
           impl->storage_offset() == offset_ && p.scalar_type() == dtype_ && same_dims(impl->sizes(), sizes_) &&
           same_dims(impl->strides(), strides_);
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
  return t.layout() == at::kStrided && same_dims(t.sizes(), ref.sizes()) && same_dims(t.strides(), ref.strides()) &&
         t.is_non_overlapping_and_dense();
}

enum class Bound { kGrad, kRelaid, kNoGrad, kStale };

// How the plan's kernels can read the grad `g` of param `index`: they take it laid out like
// `tmpl` (the tensor the plan was built with in the grads slot: the param in its storage dtype, a
// real view for complex params). As it is (Bound::kGrad; a complex grad through its real view);
// copied into `tmpl`'s layout first (Bound::kRelaid, a dense grad of another layout: the kernels
// still run, the plan stays); not at all (Bound::kNoGrad). A sparse grad, or one of a tensor
// subclass (a DTensor), makes the plan stale (Bound::kStale: the optimizer re-plans and sends the
// param to the path that takes it, Adagrad's sparse step or the reference rules, or raises
// torch's error). A grad the kernels must not read raises torch's kind of error: another dtype,
// shape or device.
inline Bound classify_real_grad(const at::Tensor& g, const at::Tensor& tmpl, size_t index, const char* backend) {
  TORCH_CHECK(g.scalar_type() == tmpl.scalar_type(), "fastopt (", backend, "): expected the grad of param ", index,
              " to have dtype ", tmpl.scalar_type(), " (the param's), but got ", g.scalar_type());
  TORCH_CHECK(g.device() == tmpl.device(), "fastopt (", backend, "): expected the grad of param ", index,
              " on ", tmpl.device(), " (the param's device), but got ", g.device());
  TORCH_CHECK(same_dims(g.sizes(), tmpl.sizes()), "fastopt (", backend, "): the grad of param ", index,
              " has shape ", g.sizes(), ", the param ", tmpl.sizes());
  return walks_like(g, tmpl) ? Bound::kGrad : Bound::kRelaid;
}

inline Bound classify_grad(const at::Tensor& g, const at::Tensor& tmpl, size_t index, const char* backend) {
  if (!g.defined()) return Bound::kNoGrad;
  if (g.layout() != at::kStrided || !is_plain(g)) return Bound::kStale;
  if (g.is_complex()) return classify_real_grad(at::view_as_real(g), tmpl, index, backend);
  return classify_real_grad(g, tmpl, index, backend);
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
// With `stochastic_state` (Note [stochastic state], update_math.h) every state slot is bfloat16.
inline void check_slot_dtypes(const std::vector<std::string>& names, const std::vector<at::ScalarType>& dtypes,
                              const std::vector<bool>& present, const char* backend, bool stochastic_state = false) {
  if (dtypes.size() < 3) return;
  for (size_t s = 2; s < dtypes.size(); ++s) {
    if (!present[s]) continue;
    const bool is_out = s + 1 == dtypes.size();
    if (stochastic_state && !is_out) {
      TORCH_CHECK(dtypes[s] == at::kBFloat16, "fastopt (", backend, "): `", names[s], "` is ", dtypes[s],
                  "; with seeds (state_dtype=torch.bfloat16) the state is BFloat16");
      continue;
    }
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

// Note [binding grads in C++]: every step reads every owner's grad, the host's work per param
// per step; so one pass over the owners, no refcounted copies where it only looks (grads are read
// through the TensorImpl), no allocation but for relaid grads, and the address each kernel reads
// written in the same pass.
//
// Binds the grads of every owner into `bound` (the plan's grads slot, one entry per owner): the
// tensor to read, undefined without a grad; and its address into `addresses` (no_grad_address()
// without a grad). A bad grad raises and a changed owner returns stale part way through: the plan
// is then dropped or rebuilt (FusedOptimizer.step), so what was bound before it does not matter.
// Nothing the user can see is written before every grad has been validated: the kernels run after.
inline BindResult bind_grads(const std::vector<at::Tensor>& owners, const std::vector<OwnerRecord>& records,
                             const std::vector<at::Tensor>& templates, std::vector<at::Tensor>& bound,
                             void** addresses, const char* backend, const GivenGrads* given = nullptr) {
  const std::vector<at::Tensor>& now = given != nullptr ? given->owners : owners;
  const size_t n = records.size();
  TORCH_CHECK(now.size() == n && bound.size() == n && templates.size() == n &&
                  (given == nullptr || given->grads.size() == n),
              "fastopt (", backend, "): expected ", n, " owners and grads to bind");
  BindResult r;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = now[i];
    if (!is_plain(p) || !records[i].matches(p)) return BindResult{true};
    const at::Tensor& g = given != nullptr ? given->grads[i] : p.unsafeGetTensorImpl()->grad();
    switch (classify_grad(g, templates[i], i, backend)) {
      case Bound::kStale:
        return BindResult{true};
      case Bound::kNoGrad:
        ++r.no_grad;
        bound[i].reset();
        addresses[i] = no_grad_address();
        continue;
      case Bound::kGrad:
        ++r.bound;
        bound[i] = g.is_complex() ? at::view_as_real(g) : g;
        break;
      case Bound::kRelaid:
        ++r.relaid;
        bound[i] = at::empty_like(templates[i]).copy_(g.is_complex() ? at::view_as_real(g) : g);
        break;
    }
    addresses[i] = bound[i].data_ptr();
  }
  return r;
}

// The owners of a plan and what bind_grads() needs of them, for the CPU and CUDA plans and, through
// fastopt._C.GradBinder, the Triton plan (triton_kernels/multi_tensor.py).
class GradBinder {
 public:
  GradBinder() = default;
  // `templates`: the grads slot as the plan was built (the layout a bound grad has), one per owner.
  GradBinder(std::vector<at::Tensor> owners, std::vector<at::Tensor> templates)
      : owners_(std::move(owners)), templates_(std::move(templates)) {
    TORCH_CHECK(owners_.size() == templates_.size(), "fastopt: one owner per param");
    records_.reserve(owners_.size());
    for (const auto& p : owners_) records_.emplace_back(p);
  }

  bool has_owners() const { return !owners_.empty(); }

  BindResult bind(std::vector<at::Tensor>& bound, void** addresses, const char* backend,
                  const GivenGrads* given = nullptr) const {
    return bind_grads(owners_, records_, templates_, bound, addresses, backend, given);
  }

 private:
  std::vector<at::Tensor> owners_, templates_;
  std::vector<OwnerRecord> records_;
};

// Note [grads held only for the step]: a plan holds its bound grads (and relaid copies) from
// bind_grads() until its step has run or been launched, then lets go (release_grads). Holding them
// longer would keep the last step's grads alive after the user's zero_grad(set_to_none=True):
// a model's whole gradient memory through the next forward and backward, which torch.optim frees,
// and, as the grads' Python objects are preserved while C++ holds the tensors, their deallocation
// inside the next step's binding (1.2 us per param on this CPU). On a GPU the kernels read the
// grads in stream order after the launch returns, as torch's own ops do with their inputs.
inline void release_grads(std::vector<at::Tensor>& bound) {
  for (auto& g : bound) g.reset();
}

}  // namespace fastopt
