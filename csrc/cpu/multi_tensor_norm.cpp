// fastopt::multi_tensor_norm on CPU: the norm (2 or inf) of all elements of a list of tensors,
// after the AMP unscale and the value clip, in one read of the data. Used by global-norm clipping.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "capability.h"
#include "fastopt/tensor_checks.h"
#include "ops.h"

namespace fastopt {
namespace cpu {
namespace {

// The norm over chunks of raw data of one dtype (no checks: the callers checked).
at::Tensor norm_of_chunks(at::ScalarType dtype, const std::vector<void*>& ptrs, const std::vector<Chunk>& chunks,
                          double norm_type, const c10::optional<at::Tensor>& inv_scale,
                          c10::optional<double> clip_value) {
  const bool l2 = norm_type == 2.0;
  TORCH_CHECK(l2 || (std::isinf(norm_type) && norm_type > 0),
              "multi_tensor_norm: norm_type must be 2.0 or inf, got ", norm_type);
  const at::ScalarType out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  double scale = 1.0;
  if (inv_scale.has_value()) {
    TORCH_CHECK(inv_scale->numel() == 1 && inv_scale->device().is_cpu(),
                "multi_tensor_norm: inv_scale must be a 1-element CPU tensor");
    scale = inv_scale->item<double>();  // a CPU read: no device sync
  }
  // Clamping to +-inf changes nothing, NaN included: one loop serves both cases.
  const double clip = clip_value.has_value() ? *clip_value : std::numeric_limits<double>::infinity();

  // Note [deterministic norm]: one partial per chunk, combined in chunk order, so the result does
  // not depend on the number of threads.
  std::vector<NormPartial> partials(chunks.size());
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "multi_tensor_norm: not implemented for '", c10::toString(dtype), "'");
  const NormArgs args{ptrs.data(), chunks.data(), static_cast<int64_t>(chunks.size()), dtype, l2, scale, clip};
  kernels().norm_partials(args, partials.data());

  double total = 0.0;
  int64_t nans = 0;
  for (const NormPartial& p : partials) {
    total = l2 ? total + p.value : (p.value > total ? p.value : total);
    nans += p.nans;
  }
  if (l2) {
    total = std::sqrt(total);
  } else if (nans > 0) {
    total = std::numeric_limits<double>::quiet_NaN();
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(out_dtype));
}

at::Tensor multi_tensor_norm_cpu(at::TensorList tensors, double norm_type,
                                 const c10::optional<at::Tensor>& inv_scale,
                                 c10::optional<double> clip_value) {
  const at::ScalarType dtype = tensors.empty() ? at::kFloat : tensors[0].scalar_type();
  std::vector<void*> ptrs;
  for (const auto& t : tensors) {
    check_plain(t, "multi_tensor_norm (cpu)", "tensors", ptrs.size());
    TORCH_CHECK(t.device().is_cpu(), "multi_tensor_norm (cpu): tensors must be on the CPU, got ",
                t.device());
    TORCH_CHECK(t.scalar_type() == dtype, "multi_tensor_norm: all tensors must have one dtype, got ",
                dtype, " and ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "multi_tensor_norm: tensors must be contiguous");
    ptrs.push_back(t.data_ptr());
  }
  return norm_of_chunks(dtype, ptrs, make_chunks(tensors), norm_type, inv_scale, clip_value);
}

}  // namespace

// The norm of a plan's bound gradients (any dense layout: a norm does not care about order).
at::Tensor grad_norm(const Slots& sl, size_t slot, double norm_type, const c10::optional<at::Tensor>& inv_scale,
                     c10::optional<double> clip_value) {
  const at::ScalarType dtype = sl.size() == 0 ? at::kFloat : sl.dtype(slot);
  return norm_of_chunks(dtype, sl.ptrs(slot), sl.chunks(), norm_type, inv_scale, clip_value);
}

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cpu);
}

}  // namespace cpu
}  // namespace fastopt
