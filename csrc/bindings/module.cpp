// The Python module fastopt._C (csrc/bindings/bindings.h lists its parts).
#include "../cpu/capability.h"
#include "bindings.h"
#include "fastopt/stochastic_round.h"

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
  // The stochastic rounding the kernels will use for bfloat16 state (Note [deterministic
  // stochastic rounding]), element by element, for the tests against the specification.
  m.def("stochastic_round_bf16", [](const at::Tensor& x, int64_t seed, int64_t step, int64_t offset) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
                "stochastic_round_bf16: expected a CPU float32 tensor, got ", x.scalar_type(), " on ", x.device());
    const at::Tensor src = x.contiguous();
    at::Tensor out = at::empty(src.sizes(), src.options().dtype(at::kBFloat16));
    const float* in = src.data_ptr<float>();
    auto* bits = reinterpret_cast<uint16_t*>(out.data_ptr());
    for (int64_t i = 0; i < src.numel(); ++i) {
      const uint32_t r = fastopt::stochastic_bits(static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                                  static_cast<uint64_t>(offset + i));
      bits[i] = fastopt::bf16_bits_stochastic(in[i], r);
    }
    return out;
  });
  fastopt::bindings::bind_plans(m);
  fastopt::bindings::bind_grad_binder(m);
  fastopt::bindings::bind_bn_relu(m);
  fastopt::bindings::bind_state_buffer(m);
}
