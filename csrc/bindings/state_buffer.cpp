// fastopt._C.carve: state tensors that lie back to back in one allocation, each with a storage of
// its own (Note [state in one buffer], fastopt/optim/_state_buffer.py).
#include <ATen/ops/from_blob.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "fastopt/state_buffer.h"

namespace fastopt {
namespace bindings {
namespace {

// Elements from a tensor's first element to one past its last (0 for an empty tensor).
int64_t span_of(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  int64_t span = 1;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) return 0;
    span += (sizes[d] - 1) * strides[d];
  }
  return span;
}

// Note [state in one buffer]: piece i is a tensor of `sizes[i]`, `strides[i]` whose first element
// is `buffer`'s element `offsets[i]`. Each piece has a storage of its own (its own bytes, not the
// buffer's): torch.save of one state tensor writes that tensor alone, DCP saves it without a copy,
// and the optimizer's state dict is one tensor per param and key as torch.optim's. The pieces keep
// the buffer's memory alive (each holds its StateBuffer, fastopt/state_buffer.h, which also counts
// the pieces that let go of their memory: Note [state moved in place]), and neither overlap each
// other nor leave the buffer (checked). Their storages are not resizable.
std::vector<at::Tensor> carve(const at::Tensor& buffer, const std::vector<int64_t>& offsets,
                              const std::vector<std::vector<int64_t>>& sizes,
                              const std::vector<std::vector<int64_t>>& strides) {
  check_plain(buffer, "carve", "buffer", 0);
  TORCH_CHECK(buffer.dim() == 1 && buffer.is_contiguous() && buffer.layout() == at::kStrided,
              "carve: the buffer must be a contiguous 1-D tensor");
  TORCH_CHECK(offsets.size() == sizes.size() && sizes.size() == strides.size(), "carve: ", offsets.size(),
              " offsets, ", sizes.size(), " sizes and ", strides.size(), " strides (one each per piece)");
  std::vector<at::Tensor> out;
  out.reserve(offsets.size());
  const int64_t item = static_cast<int64_t>(buffer.element_size());
  char* const base = static_cast<char*>(buffer.data_ptr());
  auto hold = std::make_shared<StateBuffer>(buffer.storage());
  int64_t end = 0;  // one past the previous piece
  for (size_t i = 0; i < offsets.size(); ++i) {
    TORCH_CHECK(sizes[i].size() == strides[i].size(), "carve: piece ", i, " has ", sizes[i].size(), " sizes and ",
                strides[i].size(), " strides");
    for (size_t d = 0; d < sizes[i].size(); ++d) {
      TORCH_CHECK(sizes[i][d] >= 0 && strides[i][d] >= 0, "carve: piece ", i, " has a negative size or stride");
    }
    const int64_t span = span_of(sizes[i], strides[i]);
    TORCH_CHECK(offsets[i] >= end && offsets[i] <= buffer.numel() - span, "carve: piece ", i, " (elements ",
                offsets[i], " to ", offsets[i] + span, ") overlaps the piece before it or leaves the buffer of ",
                buffer.numel());
    end = offsets[i] + span;
    out.push_back(at::for_blob(base + offsets[i] * item, sizes[i])
                      .strides(strides[i])
                      .context(new StatePiece{hold}, &release_state_piece)
                      .options(buffer.options())
                      .target_device(buffer.device())
                      .make_tensor());
  }
  return out;
}

}  // namespace

void bind_state_buffer(py::module& m) {
  m.def("carve", &carve, py::arg("buffer"), py::arg("offsets"), py::arg("sizes"), py::arg("strides"));
}

}  // namespace bindings
}  // namespace fastopt
