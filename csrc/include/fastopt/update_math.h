// Per-element update math of every optimizer, shared by the C++ (CPU) and CUDA kernels so that
// they cannot drift apart. Each function follows torch.optim's order of operations (foreach=False
// path), written out per element and rounded where torch's ops round (Note [torch's fused
// multiply-adds]); `T` is the compute type (float, or double for float64 params).
#pragma once

#include <cmath>
#include <cstddef>
#include <tuple>

#include "fastopt/grad_math.h"
#include "fastopt/macros.h"

namespace fastopt {

template <typename T>
FASTOPT_HD T sqrt_(T x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// Note [torch's fused multiply-adds]: where one ATen op computes `a + b * c`, it rounds once on
// some targets and twice on others: ATen's CPU kernels for CPUs with FMA (its AVX2 and AVX-512
// builds) fuse add(alpha=), addcmul and lerp into one fused multiply-add, its default CPU kernels
// round the product first, and its CUDA kernels fuse (nvcc contracts). addcdiv divides after the
// product on the CPU and rounds each operation. madd() is that rule for the target being
// compiled: one fma where the CPU capability has FMA (csrc/cpu/capability.h) and on the GPU, else
// a product and a sum. Nothing else may be fused: the CPU kernels are compiled with
// -ffp-contract=off and the CUDA optimizer kernels with --fmad=false (CMakeLists.txt), so that an
// expression rounds per operation as torch's chain of ops does. With this the CPU kernels follow
// torch's for-loop step to the last bit on the same CPU capability (tests/test_numerics.py).
template <typename T>
FASTOPT_HD T madd(T b, T c, T a) {
#if defined(__CUDA_ARCH__)
  return ::fma(b, c, a);
#elif defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return std::fma(b, c, a);
#else
  return b * c + a;
#endif
}

// torch.lerp: weight < 0.5 ? self + weight * (end - self) : end - (end - self) * (1 - weight),
// each a fused multiply-add where ATen's kernels fuse it (Note [torch's fused multiply-adds]).
template <typename T>
FASTOPT_HD T lerp(T self, T end, T weight) {
  const T diff = end - self;
  return weight < T(0.5) ? madd(weight, diff, self) : madd(-diff, T(1) - weight, end);
}

// torch.maximum: NaN in either argument gives NaN.
template <typename T>
FASTOPT_HD T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// What is done to a gradient before the update: AMP unscale, value clip, norm-clip coefficient,
// maximize. Absent parts are neutral values (1, +inf, 1, +1), which change no bit of g.
template <typename T>
struct GradPrep {
  T inv_scale;
  T clip;  // +inf when value clipping is off
  T coef;
  T sign;  // -1 for maximize

  // Whether unscale, clamp, the clip coefficient or maximize can change g at all. Note [neutral
  // grad prep]: kernels specialize on this (kPrep = false skips four multiplies and a clamp per
  // element, ~5-10% of a CPU step), which is exact because the neutral values change no bit of g.
  // (clip - clip == 0 holds for a finite clip and not for +inf.)
  FASTOPT_HD bool active() const {
    return inv_scale != T(1) || clip - clip == T(0) || coef != T(1) || sign != T(1);
  }
};

// The gradient the update uses: ((clamp(g * inv_scale, +-clip)) * coef) * sign, in that order
// (torch's unscale_ -> clip_grad_value_ -> clip_grad_norm_ -> maximize).
template <bool kPrep, typename T>
FASTOPT_HD T prep(T g, const GradPrep<T>& gp) {
  return kPrep ? prepare_grad<T>(g, gp.inv_scale, true, gp.clip) * gp.coef * gp.sign : g;
}

// The learning rate with torch.optim's arithmetic: a Python float computes in double; a float32
// tensor lr computes `lr / x` and `1 - lr * wd` in float32 (tensor-scalar ops in its dtype).
struct LrValue {
  double value;
  bool fp32;

  FASTOPT_HD double div(double x) const {
    return fp32 ? static_cast<double>(static_cast<float>(value) / static_cast<float>(x)) : value / x;
  }
  FASTOPT_HD double decay(double wd) const {
    return fp32 ? static_cast<double>(1.0f - static_cast<float>(value) * static_cast<float>(wd))
                : 1.0 - value * wd;
  }
};

// Note [scalars in float64]: per-step scalars are computed as torch.optim (foreach=False)
// computes its Python floats, in double, and rounded once to T; the CPU computes them on the host
// per distinct step count, the CUDA kernels per chunk on the device.
template <typename T>
FASTOPT_HD T pow_(T x, T y) {
#if defined(__CUDA_ARCH__)
  return ::pow(x, y);
#else
  return std::pow(x, y);
#endif
}

// ---- the rules ------------------------------------------------------------------------------
//
// Note [a rule in C++]: each update rule is one struct, the C++ mirror of its declaration in
// fastopt/rules.py (tests/test_rules.py checks that they agree):
//   kName, kStateNames  the op's name and its state lists, in the op's order (after params, grads);
//   Hyper, kHyper       the hyperparameters after lr, in the op's order, and their names;
//   flags(h), uses(f,s) the compile-time flags a kernel is specialized on (a bit mask, at most
//                       kFlagBits bits) and which state slots a flag set reads and writes;
//   Scalars, scalars()  the per-tensor scalars of a step, computed in double (Note [scalars in
//                       float64]) from the hyperparameters, lr and the tensor's step count;
//   update<kF>()        the per-element math: returns the new param, updates the state values.
// Everything else (op schemas, bindings, the CPU and CUDA loops, checks) is written once for every
// rule (fastopt/update_op.h, csrc/ops.cpp, csrc/bindings/plans.cpp, csrc/cpu/update.cpp,
// csrc/cpu/kernels/update.cpp, csrc/cuda/update.cu) and instantiated
// from FASTOPT_RULES. Adding a rule: its struct here, one line in FASTOPT_RULES.

// The slots of every update op, in the order its schema lists its tensor lists (Note [one schema
// per rule], update_op.h): params, grads, the rule's state lists (slot 2 + k for its state k),
// params_out (slot 2 + R::kStates).
constexpr size_t kParamSlot = 0;
constexpr size_t kGradSlot = 1;

// A hyperparameter's name and member (the bindings read and write Hyper through these).
template <typename H, typename V>
struct HyperField {
  using value_type = V;
  const char* name;
  V H::*member;
};
template <typename H, typename V>
constexpr HyperField<H, V> hyper_field(const char* name, V H::*member) {
  return {name, member};
}

// ---- Adam / AdamW ---------------------------------------------------------------------------

struct Adam {
  static constexpr const char* kName = "adam";
  static constexpr int kStates = 3;
  static constexpr const char* kStateNames[kStates] = {"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};

  struct Hyper {
    double beta1, beta2, eps, weight_decay;
    bool amsgrad, maximize, decoupled_weight_decay;
  };
  static constexpr auto kHyper = std::make_tuple(
      hyper_field("beta1", &Hyper::beta1), hyper_field("beta2", &Hyper::beta2), hyper_field("eps", &Hyper::eps),
      hyper_field("weight_decay", &Hyper::weight_decay), hyper_field("amsgrad", &Hyper::amsgrad),
      hyper_field("maximize", &Hyper::maximize), hyper_field("decoupled_weight_decay", &Hyper::decoupled_weight_decay));

  enum : unsigned { kL2 = 1, kAmsgrad = 2 };
  static constexpr unsigned kFlagBits = 2;
  FASTOPT_HD static unsigned flags(const Hyper& h) {
    return (h.weight_decay != 0 && !h.decoupled_weight_decay ? kL2 : 0u) | (h.amsgrad ? kAmsgrad : 0u);
  }
  FASTOPT_HD static constexpr bool uses(unsigned f, int s) { return s < 2 || (f & kAmsgrad) != 0; }

  template <typename T>
  struct Scalars {       // per tensor: the bias corrections depend on its step count
    T lerp_weight;       // 1 - beta1
    T beta2;
    T one_minus_beta2;
    T eps;
    T weight_decay;      // L2 (coupled) decay, used when kL2
    T decay;             // decoupled: 1 - lr * weight_decay (1 when off)
    T neg_step_size;     // -lr / (1 - beta1^t)
    T bc2_sqrt;          // (1 - beta2^t) ** 0.5, as torch computes it (a pow, which may differ from sqrt by an ulp)
  };

  template <typename T>
  FASTOPT_HD static Scalars<T> scalars(const Hyper& h, const LrValue& lr, double step) {
    const double bc1 = 1.0 - pow_(h.beta1, step);
    const double bc2 = 1.0 - pow_(h.beta2, step);
    const double decay = h.weight_decay != 0 && h.decoupled_weight_decay ? lr.decay(h.weight_decay) : 1.0;
    return Scalars<T>{static_cast<T>(1.0 - h.beta1), static_cast<T>(h.beta2), static_cast<T>(1.0 - h.beta2),
                      static_cast<T>(h.eps),         static_cast<T>(h.weight_decay), static_cast<T>(decay),
                      static_cast<T>(-lr.div(bc1)),  static_cast<T>(pow_(bc2, 0.5))};
  }

  // s: exp_avg, exp_avg_sq, max_exp_avg_sq (read and written only with kAmsgrad)
  template <unsigned kF, typename T>
  FASTOPT_HD static T update(T p, T g, T (&s)[kStates], const Scalars<T>& c) {
    T &m = s[0], &v = s[1], &vmax = s[2];
    if (kF & kL2) g = madd(c.weight_decay, p, g);      // grad.add(param, alpha=weight_decay)
    p = p * c.decay;                                   // param.mul_(1 - lr * weight_decay)
    m = lerp(m, g, c.lerp_weight);                     // exp_avg.lerp_(grad, 1 - beta1)
    v = madd(c.one_minus_beta2 * g, g, v * c.beta2);   // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    T vv = v;
    if (kF & kAmsgrad) {
      vmax = nan_max(vmax, v);                         // torch.maximum(max_exp_avg_sq, exp_avg_sq)
      vv = vmax;
    }
    const T denom = sqrt_(vv) / c.bc2_sqrt + c.eps;    // (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return p + c.neg_step_size * m / denom;            // param.addcdiv_(exp_avg, denom, value=-step_size)
  }
};

// ---- Adagrad --------------------------------------------------------------------------------

struct Adagrad {
  static constexpr const char* kName = "adagrad";
  static constexpr int kStates = 1;
  static constexpr const char* kStateNames[kStates] = {"state_sums"};

  struct Hyper {
    double lr_decay, weight_decay, eps;
    bool maximize;
  };
  static constexpr auto kHyper =
      std::make_tuple(hyper_field("lr_decay", &Hyper::lr_decay), hyper_field("weight_decay", &Hyper::weight_decay),
                      hyper_field("eps", &Hyper::eps), hyper_field("maximize", &Hyper::maximize));

  enum : unsigned { kL2 = 1 };
  static constexpr unsigned kFlagBits = 1;
  FASTOPT_HD static unsigned flags(const Hyper& h) { return h.weight_decay != 0 ? kL2 : 0u; }
  FASTOPT_HD static constexpr bool uses(unsigned, int) { return true; }

  template <typename T>
  struct Scalars {
    T weight_decay;
    T eps;
    T neg_clr;  // -lr / (1 + (t - 1) * lr_decay)
  };

  template <typename T>
  FASTOPT_HD static Scalars<T> scalars(const Hyper& h, const LrValue& lr, double step) {
    return Scalars<T>{static_cast<T>(h.weight_decay), static_cast<T>(h.eps),
                      static_cast<T>(-lr.div(1.0 + (step - 1.0) * h.lr_decay))};
  }

  // s: sum
  template <unsigned kF, typename T>
  FASTOPT_HD static T update(T p, T g, T (&s)[kStates], const Scalars<T>& c) {
    T& sum = s[0];
    if (kF & kL2) g = madd(c.weight_decay, p, g);  // grad.add(param, alpha=weight_decay)
    sum = madd(g, g, sum);                         // state_sum.addcmul_(grad, grad, value=1)
    const T std_ = sqrt_(sum) + c.eps;             // state_sum.sqrt().add_(eps)
    return p + c.neg_clr * g / std_;               // param.addcdiv_(grad, std, value=-clr)
  }
};

// ---- RMSprop --------------------------------------------------------------------------------

struct RMSprop {
  static constexpr const char* kName = "rmsprop";
  static constexpr int kStates = 3;
  static constexpr const char* kStateNames[kStates] = {"square_avgs", "grad_avgs", "momentum_buffers"};

  struct Hyper {
    double alpha, eps, weight_decay, momentum;
    bool centered, maximize;
  };
  static constexpr auto kHyper = std::make_tuple(
      hyper_field("alpha", &Hyper::alpha), hyper_field("eps", &Hyper::eps),
      hyper_field("weight_decay", &Hyper::weight_decay), hyper_field("momentum", &Hyper::momentum),
      hyper_field("centered", &Hyper::centered), hyper_field("maximize", &Hyper::maximize));

  enum : unsigned { kL2 = 1, kCentered = 2, kMomentum = 4 };
  static constexpr unsigned kFlagBits = 3;
  FASTOPT_HD static unsigned flags(const Hyper& h) {
    return (h.weight_decay != 0 ? kL2 : 0u) | (h.centered ? kCentered : 0u) | (h.momentum > 0 ? kMomentum : 0u);
  }
  FASTOPT_HD static constexpr bool uses(unsigned f, int s) {
    return s == 0 || (s == 1 && (f & kCentered) != 0) || (s == 2 && (f & kMomentum) != 0);
  }

  template <typename T>
  struct Scalars {
    T alpha;
    T one_minus_alpha;
    T eps;
    T weight_decay;
    T momentum;
    T neg_lr;
  };

  // RMSprop keeps a step count (torch does) but its math does not read it.
  template <typename T>
  FASTOPT_HD static Scalars<T> scalars(const Hyper& h, const LrValue& lr, double /*step*/) {
    return Scalars<T>{static_cast<T>(h.alpha),    static_cast<T>(1.0 - h.alpha), static_cast<T>(h.eps),
                      static_cast<T>(h.weight_decay), static_cast<T>(h.momentum), static_cast<T>(-lr.value)};
  }

  // s: square_avg, grad_avg (kCentered), momentum_buffer (kMomentum)
  template <unsigned kF, typename T>
  FASTOPT_HD static T update(T p, T g, T (&s)[kStates], const Scalars<T>& c) {
    T &v = s[0], &grad_avg = s[1], &buf = s[2];
    if (kF & kL2) g = madd(c.weight_decay, p, g);        // grad.add(param, alpha=weight_decay)
    v = madd(c.one_minus_alpha * g, g, v * c.alpha);     // square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    T avg;
    if (kF & kCentered) {
      grad_avg = lerp(grad_avg, g, c.one_minus_alpha);   // grad_avg.lerp_(grad, 1 - alpha)
      avg = sqrt_(madd(-grad_avg, grad_avg, v));         // square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    } else {
      avg = sqrt_(v);
    }
    avg = avg + c.eps;
    if (kF & kMomentum) {
      buf = buf * c.momentum + g / avg;                  // buf.mul_(momentum).addcdiv_(grad, avg): no fused product
      return madd(c.neg_lr, buf, p);                     // param.add_(buf, alpha=-lr)
    }
    return p + c.neg_lr * g / avg;                       // param.addcdiv_(grad, avg, value=-lr)
  }
};

// ---- SGD ------------------------------------------------------------------------------------

struct SGD {
  static constexpr const char* kName = "sgd";
  static constexpr int kStates = 1;
  static constexpr const char* kStateNames[kStates] = {"momentum_buffers"};

  struct Hyper {
    double momentum, dampening, weight_decay;
    bool nesterov, maximize;
  };
  static constexpr auto kHyper = std::make_tuple(
      hyper_field("momentum", &Hyper::momentum), hyper_field("dampening", &Hyper::dampening),
      hyper_field("weight_decay", &Hyper::weight_decay), hyper_field("nesterov", &Hyper::nesterov),
      hyper_field("maximize", &Hyper::maximize));

  enum : unsigned { kL2 = 1, kMomentum = 2, kNesterov = 4 };
  static constexpr unsigned kFlagBits = 3;
  FASTOPT_HD static unsigned flags(const Hyper& h) {
    return (h.weight_decay != 0 ? kL2 : 0u) | (h.momentum != 0 ? kMomentum : 0u) |
           (h.momentum != 0 && h.nesterov ? kNesterov : 0u);
  }
  // momentum=0 keeps no buffer (torch keeps no state then)
  FASTOPT_HD static constexpr bool uses(unsigned f, int) { return (f & kMomentum) != 0; }

  template <typename T>
  struct Scalars {
    T weight_decay;
    T momentum;
    T one_minus_dampening;
    T neg_lr;
    bool first;  // the buffer's first step: it becomes the grad (torch: buf = grad.clone())
  };

  // Note [SGD's first step]: torch keeps no step count for SGD (its state is the buffer alone)
  // and starts the buffer as a copy of the grad; fastopt's plans count steps per tensor anyway, so
  // the optimizer hands them a count of its own that is 0 for a buffer created for this step and
  // 1 for one that already holds a step (loaded or planned before): step 1 is the first step.
  template <typename T>
  FASTOPT_HD static Scalars<T> scalars(const Hyper& h, const LrValue& lr, double step) {
    return Scalars<T>{static_cast<T>(h.weight_decay), static_cast<T>(h.momentum),
                      static_cast<T>(1.0 - h.dampening), static_cast<T>(-lr.value), step == 1.0};
  }

  // s: momentum_buffer (read and written only with kMomentum)
  template <unsigned kF, typename T>
  FASTOPT_HD static T update(T p, T g, T (&s)[kStates], const Scalars<T>& c) {
    T& buf = s[0];
    if (kF & kL2) g = madd(c.weight_decay, p, g);             // grad.add(param, alpha=weight_decay)
    if (kF & kMomentum) {
      // buf.mul_(momentum).add_(grad, alpha=1 - dampening), or the grad itself on the first step
      buf = c.first ? g : madd(c.one_minus_dampening, g, buf * c.momentum);
      g = (kF & kNesterov) ? madd(c.momentum, buf, g) : buf;  // grad.add(buf, alpha=momentum) or buf
    }
    return madd(c.neg_lr, g, p);                              // param.add_(grad, alpha=-lr)
  }
};

// Note [stochastic state]: with state_dtype=torch.bfloat16 (fastopt/optim/_options.py) a rule's
// state tensors are bfloat16: loaded into the compute type (float32), updated by the rule's
// update<kF>() as ever, and stored with deterministic stochastic rounding (Note [deterministic
// stochastic rounding], stochastic_round.h), which keeps the small increments a moment receives
// (round-to-nearest would drop every increment below half a bf16 ulp, ~0.2% of the value). The
// random bits of state slot k of param i at element j are the low (k even) or high (k odd) 16 bits
// of stochastic_bits(seed_i + k / 2, step, j) (two slots per 32 random bits: the hash is the
// stochastic store's cost, and Adam's step is then one hash per element): seed_i is the param's
// state["seed"] (int64 bits), `step` its step count after this step's
// increment, j the element's index in the param's memory order (its position in the param's
// memory when the param is non-overlapping and dense, else its row-major position: what the
// kernels walk, Note [dense tensors, any layout], csrc/cpu/multi_tensor.h). The reference rules
// (fastopt/backends/reference.py, fastopt/reference/rounding.py) round the same values with the
// same bits, so both give the same state bit for bit, for any chunking and thread count. The
// params are stored as without it (round to nearest; float32 masters with master weights), unless
// compensation says otherwise (Note [param store]).

// Note [param store]: how the update's float32 result is written back to float16/bfloat16 params
// without master weights (compensation=, fastopt/optim/_options.py). kNearest: rounded to nearest,
// as torch. kKahan: the param has a compensation buffer c of its own dtype (state["compensation"],
// the op's params_out list): the update runs on w = float(p) + float(c), then p = round(w) and
// c = round(w - float(p)) (0 where p is not finite), so that p + c carries about twice p's bits and
// small updates accumulate instead of being rounded away (optimi's Kahan summation, the residual
// kept rather than the update). kStochastic (bfloat16 params): p is rounded stochastically with the
// bits of state slot 3 (the high 16 bits of stochastic_bits(seed_i + 1, step, j), Note [stochastic
// state]): unbiased, no buffer. The reference rules (fastopt/backends/reference.py) store the same.
enum class ParamStore : uint8_t { kNearest = 0, kKahan = 1, kStochastic = 2 };

// The random bits' state slot of a param stored stochastically (Note [param store]).
constexpr int kParamRandomSlot = 3;

// The rules, each once: FASTOPT_RULES(X) expands X(Rule) for every rule (the op registrations, the
// CPU kernel table, the CUDA instantiations).
#define FASTOPT_RULES(X) X(Adam) X(Adagrad) X(RMSprop) X(SGD)

}  // namespace fastopt
