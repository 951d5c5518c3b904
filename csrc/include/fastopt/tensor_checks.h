// The check every compiled entry point makes of every tensor it is given, before it reads a
// pointer: the tensor owns plain memory. Users can call the ops and plans directly, so this is not
// left to the Python layer (which sends such tensors to the reference rules).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace fastopt {

// A tensor whose memory a kernel may walk: it has storage and no Python dispatch of its own. Not
// so: a sparse tensor, or a wrapper subclass such as FSDP2's DTensor, whose data_ptr is not its
// elements (the first fastopt step under FSDP2 read through such a pointer and segfaulted).
// (The storage read inline: TensorImpl::has_storage() is a call into libc10 that returns just
// that, and the grad binding asks it of every grad on every step.)
inline bool is_plain(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return static_cast<bool>(impl->unsafe_storage()) && !impl->is_python_dispatch();
}

inline void check_plain(const at::Tensor& t, const char* where, const char* what, size_t index) {
  TORCH_CHECK(is_plain(t), where, ": `", what, "` tensor ", index,
              " is not a plain dense tensor (a sparse tensor, or a subclass such as DTensor whose elements are "
              "not in its own memory); the compiled kernels cannot take it (fastopt's optimizers send such "
              "params to the reference rules)");
}

}  // namespace fastopt
