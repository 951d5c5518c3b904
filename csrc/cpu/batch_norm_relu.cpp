// fastopt::bn_relu_forward / bn_relu_backward on CPU: BatchNorm followed by ReLU in two passes
// over x forward (statistics, then normalize+ReLU) and two backward (sums, then dx). The passes
// over the data are the capability kernels' (csrc/cpu/kernels/batch_norm_relu.cpp); this file
// checks, allocates and does the per-channel arithmetic between them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "capability.h"
#include "fastopt/bn_relu_host.h"
#include "fastopt/bn_relu_math.h"

namespace fastopt {
namespace cpu {
namespace {

using bn::Shape;

// The arguments of one kernel pass over x (and dy), with the scratch a sums pass needs.
struct Pass {
  BnArgs args;
  std::vector<double> sum_a, sum_b, scratch;

  Pass(const at::Tensor& x, const Shape& sh) : args{} {
    args.x = x.data_ptr();
    args.dtype = x.scalar_type();
    args.shape = BnShape{sh.n, sh.c, sh.s, sh.channels_last};
    args.threads = at::get_num_threads();
  }
  // For a sums pass: room for the per-channel sums and the kernel's scratch.
  void sums() {
    sum_a.assign(args.shape.c, 0.0);
    sum_b.assign(args.shape.c, 0.0);
    scratch.assign(args.shape.channels_last ? bn_scratch_doubles(args.shape, args.threads) : 0, 0.0);
    args.sum_a = sum_a.data();
    args.sum_b = sum_b.data();
    args.scratch = scratch.data();
  }
};

template <typename T>
struct ChannelAffine {
  std::vector<T> scale, shift;
};

template <typename T>
ChannelAffine<T> channel_affine(const Shape& sh, const T* mean, const T* invstd, const T* w, const T* b) {
  ChannelAffine<T> a{std::vector<T>(sh.c), std::vector<T>(sh.c)};
  for (int64_t c = 0; c < sh.c; ++c) {
    const auto af = bn::affine<T>(mean[c], invstd[c], w, b, c);
    a.scale[c] = af.scale;
    a.shift[c] = af.shift;
  }
  return a;
}

template <typename S>
void forward_kernel(const at::Tensor& x, const Shape& sh, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
                    at::Tensor& y, at::Tensor& mean, at::Tensor& invstd) {
  using T = at::opmath_type<S>;
  const S* xp = x.data_ptr<S>();
  T* mp = mean.data_ptr<T>();
  T* ip = invstd.data_ptr<T>();
  const Kernels& kn = kernels();
  if (training) {
    std::vector<T> k(sh.c, T(0));
    for (int64_t c = 0; c < sh.c && sh.count() > 0; ++c) k[c] = static_cast<T>(xp[sh.channels_last ? c : c * sh.s]);
    Pass sums(x, sh);
    sums.sums();
    sums.args.k = k.data();
    kn.bn_moment_sums(sums.args);
    T* rm = bn::data_or_null<T>(running_mean);
    T* rv = bn::data_or_null<T>(running_var);
    for (int64_t c = 0; c < sh.c; ++c) {
      const bn::Moments mo = bn::moments(k[c], sums.sum_a[c], sums.sum_b[c], sh.count());
      mp[c] = static_cast<T>(mo.mean);
      ip[c] = static_cast<T>(1.0 / std::sqrt(mo.var + eps));
      if (rm) rm[c] = static_cast<T>(bn::running_update(rm[c], mo.mean, momentum));
      if (rv) rv[c] = static_cast<T>(bn::running_update(rv[c], bn::unbiased(mo.var, sh.count()), momentum));
    }
  } else {
    const T* rm = running_mean->data_ptr<T>();
    const T* rv = running_var->data_ptr<T>();
    for (int64_t c = 0; c < sh.c; ++c) {
      mp[c] = rm[c];
      ip[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
    }
  }
  const auto af = channel_affine<T>(sh, mp, ip, bn::data_or_null<T>(weight), bn::data_or_null<T>(bias));
  Pass apply(x, sh);
  apply.args.out = y.data_ptr();
  apply.args.scale = af.scale.data();
  apply.args.shift = af.shift.data();
  kn.bn_apply(apply.args);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps) {
  constexpr const char* op = "fastopt::bn_relu_forward";
  const Shape sh = bn::check_forward(op, x, weight, bias, running_mean, running_var, training);
  const auto stat_opts = x.options().dtype(bn::stat_type(x));
  at::Tensor mean = at::empty({sh.c}, stat_opts), invstd = at::empty({sh.c}, stat_opts);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_forward", [&] {
    forward_kernel<scalar_t>(x, sh, weight, bias, running_mean, running_var, training, momentum, eps, y, mean, invstd);
  });
  return {y, mean, invstd};
}

template <typename S>
void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const Shape& sh, const c10::optional<at::Tensor>& weight,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
                     bool training, at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias) {
  using T = at::opmath_type<S>;
  const T* mp = mean.data_ptr<T>();
  const T* ip = invstd.data_ptr<T>();
  const Kernels& kn = kernels();
  const auto af = channel_affine<T>(sh, mp, ip, bn::data_or_null<T>(weight), bn::data_or_null<T>(bias));
  Pass sums(x, sh);
  sums.sums();
  sums.args.dy = dy.data_ptr();
  sums.args.mean = mp;
  sums.args.scale = af.scale.data();
  sums.args.shift = af.shift.data();
  kn.bn_grad_sums(sums.args);
  const std::vector<double>& sum_g = sums.sum_a;
  const std::vector<double>& sum_gc = sums.sum_b;
  T* dw = dweight.data_ptr<T>();
  T* db = dbias.data_ptr<T>();
  std::vector<T> kg(sh.c), kc(sh.c), k0(sh.c);
  for (int64_t c = 0; c < sh.c; ++c) {
    dw[c] = static_cast<T>(sum_gc[c] * static_cast<double>(ip[c]));
    db[c] = static_cast<T>(sum_g[c]);
    const auto ig = bn::input_grad<T>(af.scale[c], ip[c], sum_g[c], sum_gc[c], sh.count(), training);
    kg[c] = ig.k_g;
    kc[c] = ig.k_c;
    k0[c] = ig.k_0;
  }
  if (!dx.numel()) return;
  Pass grad(x, sh);
  grad.args.dy = dy.data_ptr();
  grad.args.out = dx.data_ptr();
  grad.args.mean = mp;
  grad.args.scale = af.scale.data();
  grad.args.shift = af.shift.data();
  grad.args.k_g = kg.data();
  grad.args.k_c = kc.data();
  grad.args.k_0 = k0.data();
  kn.bn_input_grad(grad.args);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    bool need_input_grad) {
  constexpr const char* op = "fastopt::bn_relu_backward";
  const Shape sh = bn::check_backward(op, dy, x, weight, bias, mean, invstd);
  const auto stat_opts = x.options().dtype(bn::stat_type(x));
  at::Tensor dweight = at::empty({sh.c}, stat_opts), dbias = at::empty({sh.c}, stat_opts);
  at::Tensor dx = need_input_grad ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward", [&] {
    backward_kernel<scalar_t>(dy, x, sh, weight, bias, mean, invstd, training, dx, dweight, dbias);
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("bn_relu_forward", &bn_relu_forward);
  m.impl("bn_relu_backward", &bn_relu_backward);
}

}  // namespace cpu
}  // namespace fastopt
