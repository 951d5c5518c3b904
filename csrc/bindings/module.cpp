// The Python module fastopt._C (csrc/bindings/bindings.h lists its parts).
#include "../cpu/capability.h"
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace cpu = fastopt::cpu;
  m.doc() = "fastopt compiled ops; they register themselves as torch.ops.fastopt.*";
#ifdef FASTOPT_WITH_CUDA
  m.def("built_with_cuda", [] { return true; });
#else
  m.def("built_with_cuda", [] { return false; });
#endif
  // The CPU kernels' build in use, and the ones this CPU can run (csrc/cpu/capability.h); the
  // first call makes the choice (fastopt's import does), and raises for a FASTOPT_CPU_CAPABILITY
  // this CPU or build cannot honour.
  m.def("cpu_capability", [] { return cpu::capability_name(cpu::capability()); });
  m.def("cpu_capabilities", [] {
    std::vector<std::string> out;
    for (auto c : {cpu::Capability::kDefault, cpu::Capability::kAvx2, cpu::Capability::kAvx512}) {
      if (cpu::capability_supported(c)) out.emplace_back(cpu::capability_name(c));
    }
    return out;
  });
  fastopt::bindings::bind_plans(m);
  fastopt::bindings::bind_grad_binder(m);
  fastopt::bindings::bind_bn_relu(m);
}
