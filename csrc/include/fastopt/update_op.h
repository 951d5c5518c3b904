// What every rule's update op shares on the host, written once (Note [a rule in C++],
// fastopt/update_math.h): the op's schema, its arguments as the dispatcher hands them over, the
// slots its tensor lists fill, and the checks of what a rule's flags need. The CPU and CUDA
// implementations (csrc/cpu/update.cpp, csrc/cuda/update.cu) and the registrations
// (csrc/ops.cpp, csrc/bindings/plans.cpp) are templates over the rule, instantiated for FASTOPT_RULES.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/stack.h>

#include <cstddef>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "fastopt/update_math.h"

namespace fastopt {

using Tensors = std::vector<at::Tensor>;
// A plan's or an op's tensor lists by slot (params, grads, state..., params_out), with their names
// for the error messages; an empty list is an absent slot.
using SlotLists = std::vector<std::pair<const char*, Tensors>>;

template <typename R>
constexpr size_t params_out_slot() {
  return 2 + R::kStates;
}

template <typename R>
std::string op_name() {  // "adam_": the op mutates its lists in place
  return std::string(R::kName) + "_";
}

template <typename R>
constexpr size_t hyper_count() {
  return std::tuple_size_v<std::decay_t<decltype(R::kHyper)>>;
}

// fn(field) for each hyperparameter of R, in order.
template <typename R, typename Fn>
void for_each_hyper(Fn&& fn) {
  std::apply([&](const auto&... f) { (fn(f), ...); }, R::kHyper);
}

template <typename V>
constexpr const char* schema_type() {
  static_assert(std::is_same_v<V, double> || std::is_same_v<V, bool>, "a hyperparameter is a double or a bool");
  return std::is_same_v<V, double> ? "float" : "bool";
}

// Note [one schema per rule]: "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, ...,
// Tensor(e!)[] steps, Tensor(f!)[] params_out, Tensor lr, float beta1, ..., Tensor? inv_scale,
// float? clip_value, Tensor? clip_coef, Tensor? found_inf, Tensor? seeds=None, bool stochastic_state=False, str? compensation=None) -> ()". One step for every tensor of a
// (device, dtype) group, in place: `params` are the tensors the math runs on (the fp32 masters
// with master weights, whose rounded values go to `params_out`; otherwise `params_out` is empty),
// `steps` are incremented (not when found_inf is set); the grads are first unscaled, value-clipped
// and multiplied by clip_coef (fastopt/grad_math.h). `seeds` (an int64 CPU tensor, one per param):
// the random streams of the stochastic stores; `stochastic_state`: the state lists are bfloat16,
// stored stochastically (Note [stochastic state], update_math.h); `compensation` ("kahan" or
// "stochastic", float16/bfloat16 params without masters): how the params are stored (Note [param
// store]); with "kahan", `params_out` holds the compensation buffers, in the params' dtype.
template <typename R>
std::string op_schema() {
  std::string s = op_name<R>() + "(Tensor(a!)[] params, Tensor[] grads";
  char alias = 'b';
  for (const char* name : R::kStateNames) s += std::string(", Tensor(") + alias++ + "!)[] " + name;
  s += std::string(", Tensor(") + alias++ + "!)[] steps";
  s += std::string(", Tensor(") + alias++ + "!)[] params_out, Tensor lr";
  for_each_hyper<R>([&](const auto& f) {
    s += std::string(", ") + schema_type<typename std::decay_t<decltype(f)>::value_type>() + " " + f.name;
  });
  return s + ", Tensor? inv_scale, float? clip_value, Tensor? clip_coef, Tensor? found_inf, Tensor? seeds=None, "
             "bool stochastic_state=False, str? compensation=None) -> ()";
}

// The slots of R's lists: names in the op's order, empty lists.
template <typename R>
SlotLists empty_slots() {
  SlotLists out{{"params", {}}, {"grads", {}}};
  for (const char* name : R::kStateNames) out.emplace_back(name, Tensors{});
  out.emplace_back("params_out", Tensors{});
  return out;
}

// Which slots a step writes (all but the grads).
template <typename R>
std::vector<bool> written_slots() {
  std::vector<bool> w(params_out_slot<R>() + 1, true);
  w[kGradSlot] = false;
  return w;
}

// A step with these hyperparameters reads and writes the state lists its flags use: each must hold
// one tensor per param (`present(slot)`: the list is not empty).
template <typename R, typename Present>
void check_states(const typename R::Hyper& h, Present&& present) {
  const unsigned f = R::flags(h);
  for (int k = 0; k < R::kStates; ++k) {
    TORCH_CHECK(!R::uses(f, k) || present(2 + k), op_name<R>(), ": these hyperparameters need `", R::kStateNames[k],
                "`, one tensor per param (it is empty)");
  }
}

// The grad transform of a step (Note [one schema per rule]: the shared tail of every update op), as
// the CPU and CUDA steps take it: GradScaler's scale, the value clip, the norm-clip coefficient and
// GradScaler's skip flag, each absent or a one-element tensor. `scale` is 1/scale itself
// (scale_is_inverse: the ops' inv_scale, which GradTransform.inv_scale computes as unscale_ does)
// or the scale (the CUDA plans' step, whose kernel takes the reciprocal as unscale_ does). The
// kernels see it as GradPrep values (update_math.h), read on the host (CPU) or on the device (CUDA,
// engine.cuh DeviceGradArgs).
struct GradArgs {
  c10::optional<at::Tensor> scale;
  c10::optional<double> clip_value;
  c10::optional<at::Tensor> clip_coef;
  c10::optional<at::Tensor> found_inf;
  bool scale_is_inverse = true;

  // CPU tensors only (a host read): GradScaler found inf/NaN, the step changes nothing at all
  // (params, state, step counts).
  bool skip() const { return found_inf.has_value() && found_inf->item<double>() != 0.0; }

  // CPU tensors only: the transform in double (the kernels round it to their compute type):
  // unscale factor (1/scale in float64, rounded once to float32, as GradScaler.unscale_), value
  // clip, norm-clip coefficient, maximize sign; neutral values when absent.
  GradPrep<double> prep(bool maximize) const {
    GradPrep<double> gp;
    if (!scale.has_value()) {
      gp.inv_scale = 1.0;
    } else {
      const float s = scale->item<float>();
      gp.inv_scale = scale_is_inverse ? static_cast<double>(s) : static_cast<double>(static_cast<float>(1.0 / s));
    }
    gp.clip = clip_value.has_value() ? *clip_value : std::numeric_limits<double>::infinity();
    gp.coef = clip_coef.has_value() ? clip_coef->item<double>() : 1.0;
    gp.sign = maximize ? -1.0 : 1.0;
    return gp;
  }
};

// How an update stores its results (its op's last three arguments, a cpu plan's too): the seeds of
// the stochastic stores, one per param (empty without one), whether the state is bfloat16 stored
// stochastically (Note [stochastic state]) and how the params are stored (Note [param store]).
struct Rounding {
  std::vector<int64_t> seeds;
  bool stochastic_state = false;
  ParamStore param = ParamStore::kNearest;

  bool stochastic() const { return stochastic_state || param == ParamStore::kStochastic; }
};

// An op's `compensation` argument.
inline ParamStore param_store(const c10::optional<std::string>& compensation) {
  if (!compensation.has_value()) return ParamStore::kNearest;
  if (*compensation == "kahan") return ParamStore::kKahan;
  if (*compensation == "stochastic") return ParamStore::kStochastic;
  TORCH_CHECK(false, "fastopt: compensation must be None, 'kahan' or 'stochastic', got '", *compensation, "'");
}

// What a Rounding needs of the lists it stores (the caller's slot dtypes: grads, params, whether
// params_out is there): seeds exactly when something is stored stochastically; stochastic state
// for float32, float16 and bfloat16 params; compensation for float16/bfloat16 params without
// master weights ("stochastic": bfloat16 only), with params_out (the compensation buffers) for
// "kahan" and without it for "stochastic".
inline void check_rounding(const char* op, const Rounding& r, at::ScalarType grad_dtype, at::ScalarType param_dtype,
                           bool has_params_out) {
  TORCH_CHECK(r.seeds.empty() != r.stochastic(), op, ": ", r.seeds.empty() ? "a stochastic store needs `seeds`"
              : "`seeds` were given, but nothing is stored stochastically (stochastic_state=False, no "
                "compensation='stochastic')");
  TORCH_CHECK(!r.stochastic_state || grad_dtype != at::kDouble, op,
              ": stochastic bfloat16 state is for float32, float16 and bfloat16 params, not float64");
  if (r.param == ParamStore::kNearest) return;
  const bool low = grad_dtype == at::kHalf || grad_dtype == at::kBFloat16;
  TORCH_CHECK(low && param_dtype == grad_dtype, op, ": compensation is for float16/bfloat16 params without master "
              "weights, got ", param_dtype, " params with ", grad_dtype, " grads");
  if (r.param == ParamStore::kKahan) {
    TORCH_CHECK(has_params_out, op, ": compensation='kahan' takes the compensation buffers as `params_out`");
  } else {
    TORCH_CHECK(grad_dtype == at::kBFloat16, op, ": compensation='stochastic' rounds to bfloat16; the params are ",
                grad_dtype, " (compensation='kahan' works for float16)");
    TORCH_CHECK(!has_params_out, op, ": compensation='stochastic' takes no `params_out`");
  }
}

// The arguments of R's op as the dispatcher gives them to a boxed kernel.
template <typename R>
struct UpdateOpArgs {
  SlotLists slots;
  Tensors steps;
  at::Tensor lr;
  typename R::Hyper hyper{};
  GradArgs grad;  // inv_scale, clip_value, clip_coef, found_inf
  Rounding rounding;  // seeds, stochastic_state, compensation
};

// The seeds an op was given: an int64 CPU tensor of one element per param (or none).
inline std::vector<int64_t> seed_values(const c10::optional<at::Tensor>& seeds, size_t n_params) {
  if (!seeds.has_value()) return {};
  const at::Tensor& t = *seeds;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 &&
                  t.numel() == static_cast<int64_t>(n_params),
              "fastopt: `seeds` must be a 1-D int64 CPU tensor with one seed per param (", n_params, "), got ",
              t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
  const at::Tensor c = t.contiguous();
  const int64_t* v = c.data_ptr<int64_t>();
  return std::vector<int64_t>(v, v + c.numel());
}

template <typename R>
constexpr size_t op_argument_count() {
  return 2 + R::kStates + 2 + 1 + hyper_count<R>() + 7;
}

// Takes the op's arguments off the stack (the op returns nothing). A state list the flags do not
// use is left empty, whatever was passed: the kernels neither read nor write it.
template <typename R>
UpdateOpArgs<R> pop_update_args(torch::jit::Stack& stack) {
  constexpr size_t n = op_argument_count<R>();
  TORCH_INTERNAL_ASSERT(stack.size() >= n);
  const c10::IValue* v = stack.data() + (stack.size() - n);
  UpdateOpArgs<R> a;
  a.slots = empty_slots<R>();
  size_t i = 0;
  for (size_t s = 0; s < 2 + R::kStates; ++s) a.slots[s].second = v[i++].toTensorVector();
  a.steps = v[i++].toTensorVector();
  a.slots[params_out_slot<R>()].second = v[i++].toTensorVector();
  a.lr = v[i++].toTensor();
  for_each_hyper<R>([&](const auto& f) {
    a.hyper.*(f.member) = v[i++].template to<typename std::decay_t<decltype(f)>::value_type>();
  });
  a.grad.scale = v[i++].toOptional<at::Tensor>();  // the ops take 1/scale (scale_is_inverse)
  a.grad.clip_value = v[i++].toOptional<double>();
  a.grad.clip_coef = v[i++].toOptional<at::Tensor>();
  a.grad.found_inf = v[i++].toOptional<at::Tensor>();
  a.rounding.seeds = seed_values(v[i++].toOptional<at::Tensor>(), a.slots[kParamSlot].second.size());
  a.rounding.stochastic_state = v[i++].toBool();
  a.rounding.param = param_store(v[i++].toOptional<std::string>());
  torch::jit::drop(stack, n);
  const unsigned f = R::flags(a.hyper);
  for (int k = 0; k < R::kStates; ++k) {
    if (!R::uses(f, k)) a.slots[2 + k].second.clear();
  }
  return a;
}

}  // namespace fastopt
