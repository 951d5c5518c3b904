"""A ResNet training step with fastopt's fused BatchNorm+ReLU against the same model unfused.

    python benchmarks/bench_resnet.py [--device cpu|cuda] [--no-compile] [--backend cuda]

On a GPU: torchvision's ResNet-50, batch 64, 224x224, channels_last, bf16 autocast (torch's mixed
precision recipe: fp32 params, BatchNorm in fp32 statistics). On a CPU: a ResNet-18 (torchvision's,
or the same architecture defined here when torchvision is not importable) at batch 8, 112x112,
fp32. One timed call is a training step without the optimizer: grads set to None, forward, cross-
entropy on random labels, backward. Providers: ``torch eager`` and ``torch compile`` (the unfused
model), ``fastopt <backend>`` (``fuse_bn_relu`` of the same model, eager). The report gives the
time saved against eager. Rows are appended to benchmarks/out/results.csv; the report is
benchmarks/out/report_resnet.md.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastopt  # noqa: E402
from harness import (  # noqa: E402
    OUT_DIR, Row, argument_parser, environment, format_table, markdown_table, print_header, runnable,
    selected_backends, time_alternating, write_csv,
)


class _BasicBlock(nn.Module):
    """torchvision's BasicBlock, one ReLU module shared by both uses as there."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def _resnet18(num_classes: int = 1000) -> nn.Module:
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def model_and_input(device: str) -> tuple[str, nn.Module, torch.Tensor, torch.Tensor, bool]:
    """(label, model, x, labels, autocast in bf16)."""
    gpu = device == "cuda"
    try:
        import torchvision

        model = torchvision.models.resnet50() if gpu else torchvision.models.resnet18()
        name = f"torchvision {'ResNet-50' if gpu else 'ResNet-18'}"
    except Exception:  # noqa: BLE001 - torchvision missing, or its ops not loadable with this torch
        if gpu:
            raise SystemExit("bench_resnet: the GPU case needs torchvision (ResNet-50)")
        model, name = _resnet18(), "ResNet-18 (torchvision's architecture, defined here)"
    batch, size = (64, 224) if gpu else (8, 112)
    fmt = torch.channels_last if gpu else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=device)
    label = f"{name} train step b{batch} {size}x{size}" + (" channels_last bf16 autocast" if gpu else " fp32")
    return label, model, x, labels, gpu


def _step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, amp: bool) -> Callable[[], None]:
    params = list(model.parameters())

    def run():
        for p in params:
            p.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()

    return run


def main() -> None:
    ap = argument_parser(__doc__.splitlines()[0], "(no effect: one model per device)")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile (compiling takes a while)")
    args = ap.parse_args()
    backends = selected_backends(args)
    env = environment(args.device)
    print_header(env, "ResNet training step, fused BatchNorm+ReLU against unfused", backends)
    label, model, x, labels, amp = model_and_input(args.device)
    model.train()
    fns = {"torch eager": _step(model, x, labels, amp)}
    if not args.no_compile:
        fns["torch compile"] = _step(torch.compile(model), x, labels, amp)
    fused_counts = {}
    for backend in backends:
        fused = fastopt.nn.fuse_bn_relu(copy.deepcopy(model), backend=backend)
        fused_counts[backend] = sum(type(m).__name__.startswith("BatchNormReLU") for m in fused.modules())
        fns[f"fastopt {backend}"] = _step(fused, x, labels, amp)
    notes: set[str] = set()
    fns = runnable(fns, notes)
    timings = time_alternating(fns, args.device, min_time_s=3.0, min_reps=10)
    eager = timings["torch eager"].median_ms
    best_torch = min(t.median_ms for p, t in timings.items() if p.startswith("torch "))
    rows = [Row(label, p, t.median_ms, t.p20_ms, t.p80_ms, float("nan"), float("nan"), best_torch / t.median_ms)
            for p, t in timings.items()]
    write_csv(rows, env, args.csv)
    lines = ["| provider | median ms | saved vs eager | vs best torch |", "|---|---|---|---|"]
    lines += [f"| {p} | {t.median_ms:.2f} | {100 * (1 - t.median_ms / eager):+.1f}% | {best_torch / t.median_ms:.2f}x |"
              for p, t in timings.items()]
    fused_line = ", ".join(f"{b}: {n} BatchNorm+ReLU pairs fused" for b, n in fused_counts.items())
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "report_resnet.md"), "w") as f:
        f.write(f"# fastopt BatchNorm+ReLU in a ResNet training step\n\n{env['device']}; torch {env['torch']}, CUDA "
                f"{env['cuda']}, Triton {env['triton']}; {env['date']}\n\n"
                f"Command: `python benchmarks/bench_resnet.py {' '.join(sys.argv[1:])}`. {label}; medians "
                f"(p20-p80 in results.csv) timed alternately. {fused_line}.\n\n")
        f.write(markdown_table(rows) + "\n\n" + "\n".join(lines) + "\n")
        f.write("".join(f"\n- {note}" for note in sorted(notes)))
    print()
    print(format_table(rows))
    print()
    print("\n".join(lines))
    print(f"\n{fused_line}")
    for note in sorted(notes):
        print(f"# {note}")
    print(f"\nrows appended to {os.path.relpath(args.csv)}; report in {os.path.relpath(OUT_DIR)}/report_resnet.md")


if __name__ == "__main__":
    main()
