"""Optimizer step time: fastopt against torch.optim (for-loop, foreach, fused) on one device.

    python benchmarks/bench_optim.py [--device cpu|cuda] [--full] [--only Adam,RMSprop]

Prints a table; appends rows to benchmarks/out/results.csv (device, versions and date on each).
Bytes per step are the minimum the update must move (fp32: Adam reads p, g, m, v and writes p, m,
v = 28 B/param), measured against the copy bandwidth of the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastopt  # noqa: E402
from harness import (  # noqa: E402
    OUT_DIR, Row, copy_bandwidth_gbs, environment, format_table, markdown_table, time_fn, write_csv,
)

# name -> (bytes per fp32 param per step, torch variants with an implementation on the device)
OPTIMIZERS = {
    "Adam": (28, ("for-loop", "foreach", "fused")),
    "AdamW": (28, ("for-loop", "foreach", "fused")),
    "Adagrad": (20, ("for-loop", "foreach", "fused")),
    "RMSprop": (20, ("for-loop", "foreach")),
}
TORCH_FLAGS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def shapes_for(case: str, device: str, full: bool) -> list[tuple[int, ...]]:
    big = (64 << 20 if full else 16 << 20) if device == "cuda" else (10_000_000 if full else 2_000_000)
    if case == "one tensor":
        return [(big,)]
    count, size = (2000, 1000) if full or device == "cuda" else (500, 1000)
    return [(size,)] * count


def make_step(opt_cls, shapes, device, kwargs):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = opt_cls(params, lr=1e-3, **kwargs)
    return opt.step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="larger sizes")
    ap.add_argument("--only", default="", help="comma-separated optimizer names")
    ap.add_argument("--backend", default="auto", help="fastopt backend")
    ap.add_argument("--csv", default=os.path.join(OUT_DIR, "results.csv"))
    args = ap.parse_args()
    names = [n for n in OPTIMIZERS if not args.only or n in args.only.split(",")]
    env = environment(args.device)
    print(f"# {env['device']} | torch {env['torch']} | cuda {env['cuda']} | triton {env['triton']} | {env['date']}")

    rows: list[Row] = []
    for case in ("one tensor", "many small tensors"):
        shapes = shapes_for(case, args.device, args.full)
        numel = sum(torch.Size(s).numel() for s in shapes)
        # the copy moves as many bytes as an Adam step (read + write 14 B/param each way)
        copy_bw = copy_bandwidth_gbs(numel * 14, args.device)
        print(f"# {case}: {len(shapes)} tensor(s), {numel:,} params; copy bandwidth {copy_bw:.1f} GB/s",
              flush=True)
        for name in names:
            nbytes, variants = OPTIMIZERS[name]
            label = f"{name}, {len(shapes)}x{shapes[0][0]:,}"
            providers = {f"torch {v}": (getattr(torch.optim, name), TORCH_FLAGS[v]) for v in variants}
            providers[f"fastopt {args.backend}"] = (getattr(fastopt, name), {"backend": args.backend})
            timings = {}
            for provider, (cls, kwargs) in providers.items():
                try:
                    timings[provider] = time_fn(make_step(cls, shapes, args.device, kwargs), args.device)
                except (RuntimeError, ValueError) as exc:  # a torch variant not built for the device
                    print(f"#   {label}: {provider} skipped ({str(exc).splitlines()[0]})")
            best_torch = min(t.median_ms for p, t in timings.items() if p.startswith("torch"))
            for provider, t in timings.items():
                gbs = numel * nbytes / (t.median_ms * 1e-3) / 1e9
                rows.append(Row(label, provider, t.median_ms, t.p20_ms, t.p80_ms, gbs,
                                100 * gbs / copy_bw, best_torch / t.median_ms))
            print(f"#   {label}: done", flush=True)
    write_csv(rows, env, args.csv)
    table = format_table(rows)
    with open(os.path.join(OUT_DIR, "report.md"), "w") as f:
        f.write(f"# fastopt optimizer step times\n\n{env['device']}; torch {env['torch']}, CUDA "
                f"{env['cuda']}, Triton {env['triton']}; {env['date']}\n\n")
        f.write("Command: `make bench`. Times are medians (p20-p80); GB/s counts the minimum bytes a "
                "step moves; % copy BW is against the copy bandwidth measured in the same run.\n\n")
        f.write(markdown_table(rows) + "\n")
    print()
    print(table)
    print(f"\nrows appended to {os.path.relpath(args.csv)}; report in {os.path.relpath(OUT_DIR)}/report.md")


if __name__ == "__main__":
    main()
