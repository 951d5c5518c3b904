"""Shared benchmark harness: timing, copy bandwidth, environment and CSV output.

Timing: CUDA events on a GPU (via triton.testing.do_bench when Triton is importable, else our own
event loop), wall clock after a warm-up on the CPU. Every case reports the median and p20/p80.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def time_fn(fn: Callable[[], None], device: str, *, min_time_s: float = 0.3, min_reps: int = 5) -> Timing:
    """Time ``fn`` (one optimizer step, say) after a warm-up; returns median and p20/p80 in ms."""
    for _ in range(3):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        while len(samples) < min_reps or time.perf_counter() - start < min_time_s:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
    else:
        while len(samples) < min_reps or time.perf_counter() - start < min_time_s:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8))


def copy_bandwidth_gbs(nbytes: int, device: str) -> float:
    """Measured copy bandwidth (bytes read + written per second, GB/s) for a buffer of ``nbytes``."""
    n = max(nbytes // 4, 1 << 20)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (t.median_ms * 1e-3) / 1e9


def environment(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} ({torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "triton": triton_version,
        "date": _dt.date.today().isoformat(),
    }


@dataclass
class Row:
    case: str
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbs: float
    pct_copy_bw: float
    speedup_vs_best_torch: float


def write_csv(rows: list[Row], env: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(env) + list(asdict(rows[0]))
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**env, **asdict(row)})


HEADER = ("case", "provider", "median ms", "p20-p80 ms", "GB/s", "% copy BW", "vs best torch")


def _cells(r: Row) -> tuple[str, ...]:
    return (r.case, r.provider, f"{r.median_ms:.3f}", f"{r.p20_ms:.3f}-{r.p80_ms:.3f}", f"{r.gbs:.1f}",
            f"{r.pct_copy_bw:.0f}%", f"{r.speedup_vs_best_torch:.2f}x")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows])


def format_table(rows: list[Row]) -> str:
    header = HEADER
    lines = [header] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)
