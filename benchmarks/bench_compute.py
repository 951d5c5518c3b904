"""The arithmetic of a CPU step per element, apart from memory: AdamW in each storage mode over a
tensor that stays in cache, on one thread.

    python benchmarks/bench_compute.py [--elements 65536] [--steps 300]

For each mode it times the step on one element (the host's per-step cost) and on ``--elements``
elements (small enough to stay in L2), alternating the two, and reports (big - small) / elements:
the kernel's compute per element. A step over memory cannot beat this bound divided by the
thread count; where the bound is above the bytes' time at the measured bandwidth, fewer bytes
do not make the step faster (benchmarks/results/*low-precision*.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastopt  # noqa: E402
from harness import environment  # noqa: E402

MODES = {
    "fp32": (torch.float32, {}),
    "fp32, bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "bf16 + fp32 masters": (torch.bfloat16, {"master_weights": True}),
    "bf16, round to nearest": (torch.bfloat16, {}),
    "bf16 stochastic, bf16 state": (torch.bfloat16, {"compensation": "stochastic", "state_dtype": torch.bfloat16}),
    "bf16 kahan, bf16 state": (torch.bfloat16, {"compensation": "kahan", "state_dtype": torch.bfloat16}),
    "bf16 kahan": (torch.bfloat16, {"compensation": "kahan"}),
}


def _optimizer(n: int, dtype: torch.dtype, extras: dict) -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.randn(n).to(dtype))
    p.grad = (torch.randn(n) * 1e-2).to(dtype)
    opt = fastopt.AdamW([p], lr=1e-3, backend="cpu", **extras)
    opt.step()  # state made, plan built
    return opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = environment("cpu")
    print(f"# {env['device']} | torch {env['torch']} | {env['date']} | AdamW over {args.elements} elements, in cache")
    print(f"{'mode':30s} {'host us/step':>12s} {'ns/element':>11s}")
    for name, (dtype, extras) in MODES.items():
        small, big = _optimizer(1, dtype, extras), _optimizer(args.elements, dtype, extras)
        times: dict[str, list[float]] = {"small": [], "big": []}
        for _ in range(args.steps):
            for key, opt in (("small", small), ("big", big)):
                t = time.perf_counter()
                opt.step()
                times[key].append(time.perf_counter() - t)
        assert big.step_stats.kernel == 1 and big.step_stats.reference == 0, big.step_stats
        host, step = statistics.median(times["small"]), statistics.median(times["big"])
        print(f"{name:30s} {1e6 * host:12.1f} {1e9 * (step - host) / args.elements:11.2f}")


if __name__ == "__main__":
    main()
