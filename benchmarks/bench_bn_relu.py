"""BatchNorm+ReLU forward+backward: fastopt against torch's BatchNorm2d -> ReLU, eager and compiled.

    python benchmarks/bench_bn_relu.py [--device cpu|cuda] [--full] [--only 56x56,bf16] [--backend cpu]

Shapes are ResNet-50's BatchNorm2d layers that feed a ReLU (batch 32 on a GPU; batch 8 on a CPU,
where a full batch would take minutes), in NCHW and channels_last, float32 (and bfloat16 on a GPU
or with --full). One timed call is a training forward and the gradients of x, weight and bias
(``torch.autograd.grad``, so nothing accumulates). GB/s counts the memory-traffic floor of the
fused op: forward 3 accesses per element (x twice, y once), backward 5 (x and dy twice, dx once),
and % copy BW compares it with the copy bandwidth measured in the same run. Rows are appended to
benchmarks/out/results.csv; the report is benchmarks/out/report_bn_relu.md.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastopt  # noqa: E402
from harness import (  # noqa: E402
    OUT_DIR, Row, argument_parser, copy_bandwidth_gbs, environment, format_table, launches_per_call,
    markdown_table, peak_memory_mb, plot_rows, print_header, progress, runnable, selected_backends,
    time_alternating,
    write_csv,
)

# (channels, height = width) of ResNet-50's BatchNorm -> ReLU layers, one of each size.
RESNET50 = [(64, 112), (64, 56), (128, 28), (256, 14), (512, 7)]
ACCESSES = 8  # forward 3 + backward 5, per element


def cases(device: str, full: bool) -> list[tuple[tuple[int, ...], bool, torch.dtype]]:
    gpu = device == "cuda"
    batch = (64 if full else 32) if gpu else (16 if full else 8)
    dtypes = [torch.float32, torch.bfloat16] if gpu or full else [torch.float32]
    return [((batch, c, hw, hw), cl, dtype) for dtype in dtypes for cl in (False, True) for c, hw in RESNET50]


def _label(shape, channels_last: bool, dtype: torch.dtype) -> str:
    n, c, h, w = shape
    return f"{n}x{c}x{h}x{w} {'channels_last' if channels_last else 'NCHW'} {str(dtype).replace('torch.', '')}"


def _step(module: nn.Module, fn: Callable, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    params = [x, module.weight, module.bias]

    def run():
        torch.autograd.grad(fn(x), params, dy)

    return run


def providers(shape, channels_last, dtype, device, backends, compile_torch: bool) -> dict[str, Callable[[], None]]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn_like(x)
    c = shape[1]
    # torch's low-precision recipe: bf16 activations with fp32 BatchNorm parameters (autocast's)
    bn = nn.BatchNorm2d(c).to(device)

    def eager(t):
        return torch.relu(bn(t))

    out = {"torch eager": _step(bn, eager, x, dy)}
    if compile_torch:
        out["torch compile"] = _step(bn, torch.compile(eager), x, dy)
    for backend in backends:
        fused = fastopt.nn.BatchNormReLU2d(c, backend=backend).to(device)
        out[f"fastopt {backend}"] = _step(fused, fused, x, dy)
    return out


def main() -> None:
    ap = argument_parser(__doc__.splitlines()[0], "batch 64 on a GPU (16 on a CPU) and bf16 on a CPU")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile (compiling takes a while)")
    args = ap.parse_args()
    backends = selected_backends(args)
    todo = [c for c in cases(args.device, args.full) if not args.only
            or any(w in _label(*c) for w in args.only.split(","))]
    env = environment(args.device)
    print_header(env, "BatchNorm+ReLU forward+backward", backends)

    rows: list[Row] = []
    goals: list[tuple[str, str, float, float]] = []
    notes: set[str] = set()
    for i, (shape, channels_last, dtype) in enumerate(todo):
        first_row = len(rows)
        label = "BN+ReLU " + _label(shape, channels_last, dtype)
        numel = torch.Size(shape).numel()
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        copy_bw = copy_bandwidth_gbs(nbytes, args.device)
        fns = runnable(providers(shape, channels_last, dtype, args.device, backends, not args.no_compile), notes)
        timings = time_alternating(fns, args.device)
        best_torch = min(t.median_ms for p, t in timings.items() if p.startswith("torch "))
        for provider, t in timings.items():
            gbs = ACCESSES * nbytes / (t.median_ms * 1e-3) / 1e9
            rows.append(Row(label, provider, t.median_ms, t.p20_ms, t.p80_ms, gbs, 100 * gbs / copy_bw,
                            best_torch / t.median_ms, launches_per_call(fns[provider], args.device),
                            peak_memory_mb(fns[provider], args.device)))
            if provider.startswith("fastopt "):
                compiled = timings.get("torch compile")
                goals.append((label, provider, timings["torch eager"].median_ms / t.median_ms,
                              compiled.median_ms / t.median_ms if compiled else float("nan")))
        print(f"# {progress(i + 1, len(todo))} {label}: copy {copy_bw:.1f} GB/s; "
              + ", ".join(f"{p} {t.median_ms:.3f} ms" for p, t in timings.items()), flush=True)
        write_csv(rows[first_row:], env, args.csv)  # per case: a run cut short keeps its rows
        del fns

    for note in sorted(notes):
        print(f"# {note}")
    os.makedirs(OUT_DIR, exist_ok=True)
    goal_lines = ["| case | provider | vs eager | vs torch.compile |", "|---|---|---|---|"]
    goal_lines += [f"| {c} | {p} | {e:.2f}x | {'-' if k != k else f'{k:.2f}x'} |" for c, p, e, k in goals]
    with open(os.path.join(OUT_DIR, "report_bn_relu.md"), "w") as f:
        f.write(f"# fastopt BatchNorm+ReLU forward+backward\n\n{env['device']}; torch {env['torch']}, CUDA "
                f"{env['cuda']}, Triton {env['triton']}; {env['date']}\n\n"
                f"Command: `python benchmarks/bench_bn_relu.py {' '.join(sys.argv[1:])}`. Medians (p20-p80) "
                "timed alternately; GB/s counts 8 accesses per element (the fused op's floor); vs best "
                "torch is the faster of eager and torch.compile over this provider.\n\n")
        f.write(markdown_table(rows) + "\n\n" + "\n".join(goal_lines) + "\n")
        f.write("".join(f"\n- {note}" for note in sorted(notes)))
    plots = plot_rows(rows, OUT_DIR, prefix="bn_relu_")
    print()
    print(format_table(rows))
    print()
    print("\n".join(goal_lines))
    print(f"\nrows appended to {os.path.relpath(args.csv)}; report in {os.path.relpath(OUT_DIR)}/report_bn_relu.md"
          + (f"; plots: {', '.join(os.path.relpath(p) for p in plots)}" if plots else " (no matplotlib: no plots)"))


if __name__ == "__main__":
    main()
