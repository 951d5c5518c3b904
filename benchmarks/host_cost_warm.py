"""The host's work of a warm step at many one-element params, as a multiple of one param's, in one
process (issue 29's x5 goal).

    python benchmarks/host_cost_warm.py [--params 4000] [--rounds 30] [--threads 1]

Three AdamW optimizers (backend="cpu"): one one-element param; ``--params`` one-element params,
each param and grad its own tensor; and as many whose params and grads are views of one buffer
each. The grads stay between steps. Each round steps each optimizer 12 times in a row and keeps
the last 10 (warm caches: ``make bench``'s host rows alternate the providers step by step, so
fastopt's step there finds the caches the others left); prints the medians and their multiples
of the one param's. Run it twice per build: this machine's speed moves between runs, so only the
ratios of one run compare.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastopt


def optimizer(kind: str, n: int) -> fastopt.AdamW:
    if kind == "views":
        data, grads = torch.randn(n), torch.randn(n)
        params = [torch.nn.Parameter(d) for d in data.split(1)]
        for p, g in zip(params, grads.split(1)):
            p.grad = g
    else:
        params = [torch.nn.Parameter(torch.randn(1)) for _ in range(1 if kind == "one param" else n)]
        for p in params:
            p.grad = torch.randn(1)
    opt = fastopt.AdamW(params, lr=1e-3, backend="cpu")
    opt.step()
    opt.step()
    return opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    opts = {k: optimizer(k, args.params) for k in ("one param", "separate", "views")}
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds):
        for kind, opt in opts.items():
            for i in range(12):
                start = time.perf_counter()
                opt.step()
                if i >= 2:
                    times[kind].append((time.perf_counter() - start) * 1e6)
    unit = statistics.median(times["one param"])
    for kind, t in times.items():
        print(f"{kind:10s} {statistics.median(t):8.1f} us  x{statistics.median(t) / unit:.1f}")


if __name__ == "__main__":
    main()
