"""The grad binding of a past commit against the working tree's, in one process, alternately.

    python benchmarks/ab_grad_binding.py --base 64062eb [--params 4000] [--steps 200]

Note [binding grads in C++] (csrc/include/fastopt/grad_binding.h) is the host's work per param per
step. Timing whole steps from two builds compares two processes, which this machine's changing
speed makes unreliable (the same build's step differed 1.6x between runs); here both bindings are
compiled into one extension (the base's header from ``git show``, in a namespace of its own) and
bind the same params' grads, base then working tree, ``--steps`` times: "warm" back to back,
"cold" after a 32 MB sweep that evicts the caches, as a training step's forward and backward do.
Two layouts: every param and grad its own tensor, and params and grads views of one buffer each.
Prints the median microseconds of a bind and a release of the grads for each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import torch
from torch.utils.cpp_extension import load_inline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "csrc/include/fastopt/grad_binding.h"

SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <chrono>
#include "fastopt/grad_binding.h"
#include "base_binding.h"

template <typename Binder>
double time_bind(const Binder& b, std::vector<at::Tensor>& bound, std::vector<void*>& addresses, at::Tensor& sweep,
                 bool cold) {
  if (cold) sweep.add_(1.0);
  const auto t0 = std::chrono::steady_clock::now();
  b.bind(bound, addresses.data(), "cpu");
  fastopt::release_grads(bound);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e6;
}

// (base median us, working tree median us)
std::vector<double> compare(std::vector<at::Tensor> owners, int64_t steps, bool cold) {
  std::vector<at::Tensor> templates;
  for (const auto& p : owners) templates.push_back(p.detach());
  const fastopt::GradBinder now(owners, templates);
  const fastopt_base::GradBinder base(owners, templates);
  std::vector<at::Tensor> bound(owners.size());
  std::vector<void*> addresses(owners.size());
  at::Tensor sweep = at::zeros({8 << 20});
  std::vector<double> a, b;
  for (int64_t i = 0; i < steps; ++i) {
    a.push_back(time_bind(base, bound, addresses, sweep, cold));
    b.push_back(time_bind(now, bound, addresses, sweep, cold));
  }
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  return {a[a.size() / 2], b[b.size() / 2]};
}
"""


def base_header(commit: str, out_dir: str) -> None:
    """The base's grad_binding.h with its namespace renamed (fastopt_base, which sees fastopt's
    other headers as they are now), so that both bindings link into one extension."""
    text = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{HEADER}"], check=True, capture_output=True,
                          text=True).stdout
    text = text.replace("#pragma once", "").replace("namespace fastopt {",
                                                    "namespace fastopt_base {\nusing namespace fastopt;", 1)
    with open(os.path.join(out_dir, "base_binding.h"), "w") as f:
        f.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit whose binding is the baseline")
    parser.add_argument("--params", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base_header(args.base, tmp)
        ext = load_inline("fastopt_ab_grad_binding", cpp_sources=SOURCE, functions=["compare"],
                          extra_include_paths=[os.path.join(ROOT, "csrc/include"), tmp], extra_cflags=["-O3"],
                          build_directory=tmp)
        n = args.params
        separate = [torch.nn.Parameter(torch.randn(1)) for _ in range(n)]
        for p in separate:
            p.grad = torch.randn(1)
        data, grads = torch.randn(n), torch.randn(n)
        views = [torch.nn.Parameter(data[i:i + 1]) for i in range(n)]
        for i, p in enumerate(views):
            p.grad = grads[i:i + 1]
        print(f"{torch.__version__}, {n} one-element params, {args.steps} binds each, base {args.base}")
        for layout, params in (("separate tensors", separate), ("views of one buffer", views)):
            for cold in (False, True):
                base, now = ext.compare(params, args.steps, cold)
                print(f"{layout:20s} {'cold' if cold else 'warm'}: base {base:7.1f} us, working tree {now:7.1f} us "
                      f"({base / now:.2f}x)")


if __name__ == "__main__":
    main()
