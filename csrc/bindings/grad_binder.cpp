// fastopt._C.GradBinder: the Triton plan's grads bound in C++ (Note [the Triton plan binds in C++]).
#include <algorithm>

#include "bindings.h"
#include "fastopt/range_table.h"

namespace fastopt {
namespace bindings {
namespace {
using Tensors = std::vector<at::Tensor>;

// Note [the Triton plan binds in C++]: the Triton plan's grads are bound by the same C++ code as
// the CPU and CUDA plans' (a Python loop over the params cost ~1.3 us each, 5 ms a step at 4,000
// tensors). bind() returns None when the plan is stale, else (bound, relaid, absent, table):
// `table` the grad address of every param (int64; -1 without a grad, Note [absent grads]) in a
// fresh CPU tensor, pinned if asked, for an asynchronous upload, when an address changed since the
// last bind; else None. Without the extension the Triton plan binds in Python (same protocol).
class TableBinder {
 public:
  TableBinder(Tensors owners, Tensors templates)
      : bound_(templates.size()), addresses_(templates.size()), uploaded_(templates.size()) {
    for (size_t i = 0; i < templates.size(); ++i) uploaded_[i] = reinterpret_cast<int64_t>(templates[i].data_ptr());
    binder_ = fastopt::GradBinder(std::move(owners), std::move(templates));
  }

  py::object bind(c10::optional<Tensors> owners, c10::optional<std::vector<OptTensor>> grads, bool pinned) {
    const c10::optional<GivenGrads> given = given_grads(std::move(owners), std::move(grads));
    const BindResult r = binder_.bind(bound_, addresses_.data(), "triton", given.has_value() ? &*given : nullptr);
    if (r.stale) return py::none();
    bool changed = false;
    for (size_t i = 0; i < addresses_.size(); ++i) {
      const int64_t a = reinterpret_cast<int64_t>(addresses_[i]);
      changed = changed || a != uploaded_[i];
      uploaded_[i] = a;
    }
    py::object table = py::none();
    if (changed) {
      at::Tensor t = at::empty({static_cast<int64_t>(uploaded_.size())},
                               at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
      std::copy(uploaded_.begin(), uploaded_.end(), t.data_ptr<int64_t>());
      table = py::cast(t);
    }
    return py::make_tuple(r.bound, r.relaid, r.no_grad, table);
  }

  void release_grads() { fastopt::release_grads(bound_); }

  // Note [state moved in place] (fastopt/state_buffer.h): `tensors[k]` belongs to owner `owners[k]`.
  void watch(const Tensors& tensors, const std::vector<int64_t>& owners) {
    TORCH_CHECK(tensors.size() == owners.size(), "watch: one owner index per tensor");
    for (size_t k = 0; k < tensors.size(); ++k) binder_.watch(tensors[k], static_cast<size_t>(owners[k]));
  }

 private:
  fastopt::GradBinder binder_;
  Tensors bound_;
  std::vector<void*> addresses_;  // this step's, from the binding
  std::vector<int64_t> uploaded_;  // as the plan's table holds them
};

// The Triton plan's update chunks (Note [ranges on the GPU], fastopt/range_table.h): `fixed` the
// fixed slots' addresses with their element sizes; update() takes a bind's grad table (as
// TableBinder.bind returns it) and says whether the chunks changed; table() copies them into a
// fresh CPU tensor, pinned if asked, for an asynchronous upload.
class PyRangeTable {
 public:
  PyRangeTable(std::vector<int64_t> numels, const std::vector<std::pair<std::vector<int64_t>, int64_t>>& fixed,
               int64_t grad_itemsize, bool joinable, int64_t chunk) {
    std::vector<std::pair<const int64_t*, int64_t>> views;  // read by the constructor only
    for (const auto& [row, itemsize] : fixed) {
      TORCH_CHECK(row.size() == numels.size(), "RangeTable: one address per tensor in every fixed slot");
      views.emplace_back(row.data(), itemsize);
    }
    ranges_ = fastopt::RangeTable(std::move(numels), views, grad_itemsize, joinable, chunk);
  }

  bool update(const at::Tensor& grads) {
    TORCH_CHECK(grads.is_cpu() && grads.scalar_type() == at::kLong && grads.is_contiguous() &&
                    grads.numel() == ranges_.size(),
                "RangeTable.update: one int64 grad address per tensor, in a contiguous CPU tensor");
    return ranges_.update(grads.data_ptr<int64_t>());
  }

  at::Tensor table(bool pinned) const {
    const auto& values = ranges_.table();
    at::Tensor t = at::empty({static_cast<int64_t>(values.size())},
                             at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
    std::copy(values.begin(), values.end(), t.data_ptr<int64_t>());
    return t;
  }

  int64_t n_chunks() const { return ranges_.n_chunks(); }
  int64_t capacity() const { return ranges_.capacity(); }
  bool any_join() const { return ranges_.any_join(); }

 private:
  fastopt::RangeTable ranges_;
};

}  // namespace

void bind_grad_binder(py::module& m) {
  // Note [one grad check]: the checks every path applies to a grad it is about to read (dtype,
  // device and shape of its param), for the paths that take grads without a plan (the reference
  // rules, a planned bucket's unplanned rest): the same C++ code the plans' binding runs
  // (classify_real_grad), so one implementation says what is refused and how. `grads` are the
  // present grads (real views for complex params), `indices` their params' places in the group.
  // fastopt/_plan.py keeps a Python twin only for when this extension is absent or Dynamo traces.
  m.def(
      "check_grads",
      [](const Tensors& grads, const Tensors& templates, const std::vector<int64_t>& indices,
         const std::string& backend) {
        TORCH_CHECK(grads.size() == templates.size() && grads.size() == indices.size(),
                    "check_grads: expected as many grads, templates and indices");
        for (size_t i = 0; i < grads.size(); ++i)
          classify_real_grad(grads[i], templates[i], static_cast<size_t>(indices[i]), backend.c_str());
      },
      py::arg("grads"), py::arg("templates"), py::arg("indices"), py::arg("backend"));
  py::class_<TableBinder, std::shared_ptr<TableBinder>>(m, "GradBinder")
      .def(py::init<Tensors, Tensors>(), py::arg("owners"), py::arg("templates"))
      .def("bind", &TableBinder::bind, py::arg("owners") = py::none(), py::arg("grads") = py::none(),
           py::arg("pinned") = false)
      .def("release_grads", &TableBinder::release_grads)
      .def("watch", &TableBinder::watch, py::arg("tensors"), py::arg("owners"));
  py::class_<PyRangeTable, std::shared_ptr<PyRangeTable>>(m, "RangeTable")
      .def(py::init<std::vector<int64_t>, std::vector<std::pair<std::vector<int64_t>, int64_t>>, int64_t, bool,
                    int64_t>(),
           py::arg("numels"), py::arg("fixed"), py::arg("grad_itemsize"), py::arg("joinable"), py::arg("chunk"))
      .def("update", &PyRangeTable::update, py::arg("grads"))
      .def("table", &PyRangeTable::table, py::arg("pinned") = false)
      .def_property_readonly("n_chunks", &PyRangeTable::n_chunks)
      .def_property_readonly("capacity", &PyRangeTable::capacity)
      .def_property_readonly("any_join", &PyRangeTable::any_join)
      .def_property_readonly_static("row", [](py::object) { return fastopt::RangeTable::kRow; })
      .def_property_readonly_static("max_tensors", [](py::object) { return fastopt::RangeTable::kMaxTensors; });
}

}  // namespace bindings
}  // namespace fastopt
