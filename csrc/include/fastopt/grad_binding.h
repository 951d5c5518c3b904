// Binding a step's gradients into a cached plan, shared by the CPU (Slots) and CUDA (CudaPlan)
// plans. See Note [the plan life cycle] (fastopt/_plan.py) for the whole protocol.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fastopt/no_grad.h"
#include "fastopt/state_buffer.h"
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
// storage, dtype, shape or strides (`p.data = ...`, `model.half()`), or whose storage was given new
// memory (`model.share_memory()`, `untyped_storage().resize_()`: the same storage, another
// address; the plan once kept writing to the freed one), no longer matches: the plan is stale.
// Holding the storage keeps its address from being reused by a new allocation.
//
// Note [one owner, one record]: the binding compares every owner with its record on every step,
// and, in the common case, the owner's grad with the same record (Note [binding grads in C++]); so
// a record holds all of it inline (sizes and strides of up to kInlineDims dims without a heap
// block of their own), the records lie back to back in one vector, and a step reads no tensor but
// the owner and its grad.
class OwnerRecord {
 public:
  static constexpr unsigned kInlineDims = 5;

  explicit OwnerRecord(const at::Tensor& p)
      : storage_((check_plain(p, "fastopt", "owners", 0), p.storage())),
        memory_(storage_.unsafeGetStorageImpl()->data_ptr().get()), offset_(p.storage_offset()), dtype_(p.scalar_type()),
        device_(p.device()), dense_(p.is_non_overlapping_and_dense()), sizes_(p.sizes().begin(), p.sizes().end()),
        strides_(p.strides().begin(), p.strides().end()) {}

  // Called for every owner on every step (Note [binding grads in C++]): no refcounted copies.
  // `p` has storage (is_plain, checked first).
  bool matches(const at::Tensor& p) const {
    const c10::TensorImpl* impl = p.unsafeGetTensorImpl();
    const c10::StorageImpl* storage = storage_.unsafeGetStorageImpl();
    return impl->unsafe_storage().unsafeGetStorageImpl() == storage && storage->data_ptr().get() == memory_ &&
           impl->storage_offset() == offset_ && p.scalar_type() == dtype_ && same_dims(impl->sizes(), sizes_) &&
           same_dims(impl->strides(), strides_);
  }

  // Whether the kernels read `g` as it is, as the param's grad: a plain strided tensor of the
  // owner's dtype, device, sizes and strides, so dense like the owner (what classify_grad calls
  // Bound::kGrad, for a plan whose grads slot is laid out like its owners: `like_owner`). Only
  // looks; false sends the grad to classify_grad, which says what else it is (or raises).
  // `held`: the storage of a grad this step already took (so on the owners' device), or null; a
  // grad in it is on that device (a tensor's device is its storage's) and is not asked again.
  bool takes_grad(const at::Tensor& g, const c10::StorageImpl* held = nullptr) const {
    const c10::TensorImpl* impl = g.unsafeGetTensorImpl();
    const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
    return impl->layout() == at::kStrided && storage != nullptr && !impl->is_python_dispatch() &&
           laid_out_alike(g, /*device_known=*/storage == held);
  }

  // The grads slot's template is laid out like this owner, which is dense (not a real view of a
  // complex param): a grad that takes_grad() is then bound as it is.
  bool like(const at::Tensor& tmpl) const { return dense_ && !at::isComplexType(dtype_) && laid_out_alike(tmpl); }

 private:
  // The owner's dtype, sizes, strides and device (unless `device_known`), as built. (Inlined: a
  // call per grad per step.)
  C10_ALWAYS_INLINE bool laid_out_alike(const at::Tensor& t, bool device_known = false) const {
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    return t.scalar_type() == dtype_ && same_dims(impl->sizes(), sizes_) && same_dims(impl->strides(), strides_) &&
           (device_known || t.device() == device_);
  }

  c10::Storage storage_;
  const void* memory_;  // storage_'s memory as built
  int64_t offset_;
  at::ScalarType dtype_;
  c10::Device device_;
  bool dense_;  // non-overlapping and dense
  c10::SmallVector<int64_t, kInlineDims> sizes_, strides_;
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

// A param's .grad(), read as torch's own autograd code reads it (torch::autograd::impl::
// get_autograd_meta: every TensorImpl's autograd metadata is an AutogradMeta), without the two
// out-of-line calls of TensorImpl::grad() (a virtual one among them) per param per step.
inline const at::Tensor& grad_of(const c10::TensorImpl* impl) {
  static const at::Tensor undefined;
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta());
  return meta != nullptr ? meta->grad_ : undefined;
}

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
                             const std::vector<at::Tensor>& templates, const std::vector<uint8_t>& like_owner,
                             std::vector<at::Tensor>& bound, void** addresses, const char* backend,
                             const GivenGrads* given = nullptr) {
  const std::vector<at::Tensor>& now = given != nullptr ? given->owners : owners;
  const size_t n = records.size();
  TORCH_CHECK(now.size() == n && bound.size() == n && templates.size() == n && like_owner.size() == n &&
                  (given == nullptr || given->grads.size() == n),
              "fastopt (", backend, "): expected ", n, " owners and grads to bind");
  BindResult r;
  const c10::StorageImpl* held = nullptr;  // the storage of the last grad held in `bound`
  char* held_data = nullptr;  // its memory
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = now[i];
    // the record's storage is never null, so a match also says that `p` has storage
    if (p.unsafeGetTensorImpl()->is_python_dispatch() || !records[i].matches(p)) return BindResult{true};
    const at::Tensor& g = given != nullptr ? given->grads[i] : grad_of(p.unsafeGetTensorImpl());
    // the common case in one look at the grad and the record (Note [one owner, one record])
    const Bound kind = g.defined() && like_owner[i] && records[i].takes_grad(g, held)
                           ? Bound::kGrad
                           : classify_grad(g, templates[i], i, backend);
    switch (kind) {
      case Bound::kStale:
        return BindResult{true};
      case Bound::kNoGrad:
        ++r.no_grad;
        bound[i].reset();
        addresses[i] = no_grad_address();
        continue;
      case Bound::kGrad: {
        ++r.bound;
        // Note [one hold per grad storage]: a grad that shares its storage with the grad held
        // before it (views of one buffer: DDP's bucket views, a flat grad buffer) is kept alive
        // through the step by that hold (the kernels read addresses, and a storage's memory lives
        // as long as one tensor of it does); the atomic increment and decrement of its own
        // refcount were most of the binding's time (4,000 one-element params, Note [binding
        // grads in C++]).
        // Its address is computed as TensorImpl::mutable_data() does from the held grad's storage
        // (whose data the held grad's data_ptr() below made mutable, a copy-on-write storage
        // materialized).
        const c10::TensorImpl* gi = g.unsafeGetTensorImpl();
        const c10::StorageImpl* storage = gi->unsafe_storage().unsafeGetStorageImpl();
        if (storage == held) {
          bound[i].reset();
          addresses[i] = gi->numel() == 0 ? nullptr : held_data + gi->dtype().itemsize() * gi->storage_offset();
          continue;
        }
        bound[i] = g.is_complex() ? at::view_as_real(g) : g;
        addresses[i] = bound[i].data_ptr();
        held = storage;
        held_data = static_cast<char*>(storage->data_ptr().get());
        continue;
      }
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
    like_owner_.reserve(owners_.size());
    for (size_t i = 0; i < owners_.size(); ++i) {
      records_.emplace_back(owners_[i]);
      like_owner_.push_back(records_.back().like(templates_[i]));
    }
  }

  bool has_owners() const { return !owners_.empty(); }

  // A tensor of owner i's that the plan writes and keeps the address of (its state, step count,
  // master): Note [state moved in place]. One that shares the owner's storage is the owner's
  // record's to check.
  void watch(const at::Tensor& t, size_t owner) {
    TORCH_CHECK(owner < owners_.size(), "fastopt: watch: no owner ", owner);
    if (t.defined() && t.has_storage() &&
        t.storage().unsafeGetStorageImpl() == owners_[owner].storage().unsafeGetStorageImpl()) {
      return;
    }
    watch_.add(t);
  }

  BindResult bind(std::vector<at::Tensor>& bound, void** addresses, const char* backend,
                  const GivenGrads* given = nullptr) const {
    if (watch_.moved()) return BindResult{true};
    return bind_grads(owners_, records_, templates_, like_owner_, bound, addresses, backend, given);
  }

 private:
  MemoryWatch watch_;
  std::vector<at::Tensor> owners_, templates_;
  std::vector<OwnerRecord> records_;
  std::vector<uint8_t> like_owner_;  // OwnerRecord::like(the owner's template)
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
