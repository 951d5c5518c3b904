// The state buffer's pieces (fastopt._C.carve, csrc/bindings/state_buffer.cpp; Note [state in one
// buffer], fastopt/optim/_state_buffer.py) and how a plan sees a state tensor given new memory.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace fastopt {

// One state buffer's memory, held by each of its pieces. `released` counts the pieces that let
// their memory go: a piece dropped, or given other memory in place (share_memory_(), `.data = `).
struct StateBuffer {
  explicit StateBuffer(c10::Storage s) : storage(std::move(s)) {}
  c10::Storage storage;
  std::atomic<uint64_t> released{0};
};

// A piece's DataPtr context.
struct StatePiece {
  std::shared_ptr<StateBuffer> buffer;
};

inline void release_state_piece(void* ctx) {
  auto* piece = static_cast<StatePiece*>(ctx);
  piece->buffer->released.fetch_add(1, std::memory_order_relaxed);
  delete piece;
}

// The buffer whose piece `t`'s memory is, or null.
inline std::shared_ptr<StateBuffer> state_buffer_of(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return nullptr;
  const c10::DataPtr& data = t.storage().data_ptr();
  if (data.get_deleter() != &release_state_piece) return nullptr;
  return static_cast<StatePiece*>(data.get_context())->buffer;
}

// Note [state moved in place]: a plan keeps its state tensors' addresses (params are its owners,
// checked by their records). A state tensor given new memory after the plan was built
// (`state[p]["exp_avg"].share_memory_()`, `.data = ...`) makes the plan stale, as a param does:
// before, its steps kept writing to the old memory (freed, or the buffer's). Checked on every
// bind in O(buffers) for the pieces of state buffers (their `released` counts: a spurious re-plan
// when a piece is dropped, which happens with the plan dropped anyway: a failed step,
// load_state_dict), and per tensor for the rest (state over the buffer's size limit, or made
// without it), which are few and large. Not seen: the memory of a piece whose old storage is
// still held elsewhere (a view of the state tensor kept by the user) after a `.data = `.
class MemoryWatch {
 public:
  void add(const at::Tensor& t) {
    if (std::shared_ptr<StateBuffer> buffer = state_buffer_of(t)) {
      for (const auto& seen : buffers_) {
        if (seen.first == buffer) return;
      }
      const uint64_t released = buffer->released.load(std::memory_order_relaxed);
      buffers_.emplace_back(std::move(buffer), released);
    } else if (t.defined() && t.has_storage()) {
      tensors_.push_back({t, t.storage().unsafeGetStorageImpl(), t.storage().unsafeGetStorageImpl()->data_ptr().get()});
    }
  }

  bool moved() const {
    for (const auto& [buffer, released] : buffers_) {
      if (buffer->released.load(std::memory_order_relaxed) != released) return true;
    }
    for (const auto& w : tensors_) {
      const c10::StorageImpl* storage = w.tensor.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
      if (storage != w.storage || storage->data_ptr().get() != w.memory) return true;
    }
    return false;
  }

 private:
  struct Watched {
    at::Tensor tensor;
    const c10::StorageImpl* storage;  // as built (the plan holds the tensor, and so this storage)
    const void* memory;
  };
  std::vector<std::pair<std::shared_ptr<StateBuffer>, uint64_t>> buffers_;
  std::vector<Watched> tensors_;
};

}  // namespace fastopt
