"""Shared benchmark harness: timing, copy bandwidth, environment and CSV output.

Timing: CUDA events on a GPU, wall clock after a warm-up on the CPU; every case reports the
median and p20/p80.

Note [alternate timing]: the providers of one case are timed one call each in turn, rotating who
goes first, rather than one after the other: on a shared or throttling machine a slow phase then
slows every provider alike, and the ratios between them hold even when the absolute times drift.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

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


def _sample(fn: Callable[[], None], device: str) -> float:
    """One timed call of ``fn`` in ms: CUDA events on a GPU, wall clock on the CPU."""
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _timing(samples: list[float]) -> Timing:
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8))


def runnable(steps: dict[str, Callable[[], None]], notes: set[str]) -> dict[str, Callable[[], None]]:
    """The providers whose step runs: each is called once before it is timed, and one that raises
    (torch 2.11 accepts ``Adagrad(fused=True)`` for CUDA params at construction and refuses it at
    the first step) gets a one-line note in the output and the report instead of ending the run."""
    out = {}
    for name, step in steps.items():
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - whatever the provider raises, the run goes on
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            notes.add(f"{name} skipped: {type(exc).__name__}: {first[:200]}")
            continue
        out[name] = step
    return out


def time_alternating(fns: dict[str, Callable[[], None]], device: str, *, min_time_s: float = 0.25,
                     min_reps: int = 10, warmup: int = 3) -> dict[str, Timing]:
    """Time several providers of the same work, one call of each in turn (Note [alternate timing]):
    a slow phase of a shared, noisy machine then hits every provider alike instead of whichever
    was being timed. Returns each provider's median and p20/p80 in ms."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    names = list(fns)
    rounds = 0
    while rounds < min_reps or time.perf_counter() - start < min_time_s * len(fns):
        order = names[rounds % len(names):] + names[:rounds % len(names)]  # rotate who goes first
        for name in order:
            samples[name].append(_sample(fns[name], device))
        rounds += 1
    return {name: _timing(xs) for name, xs in samples.items()}


def time_fn(fn: Callable[[], None], device: str, *, min_time_s: float = 0.3, min_reps: int = 5) -> Timing:
    """Time ``fn`` alone after a warm-up; returns median and p20/p80 in ms."""
    return time_alternating({"fn": fn}, device, min_time_s=min_time_s, min_reps=min_reps)["fn"]


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


def launches_per_call(fn: Callable[[], None], device: str) -> Optional[int]:
    """CUDA kernel launches of one call of ``fn`` (from the profiler); None on the CPU."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    return len(kernels)


def kernel_ms_per_call(fn: Callable[[], None], device: str, calls: int = 5) -> Optional[float]:
    """The device's own time per call of ``fn``: the durations of the CUDA kernels (and memsets,
    copies) it ran, from the profiler, summed and averaged over ``calls`` calls; None on the CPU.
    Against the median (CUDA events around the Python call, the host's gaps included), it says
    how much of a step is the host's: equal when the GPU never waits, far less when it does."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    busy_us = sum(e.time_range.elapsed_us() for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA)
    return busy_us / calls / 1e3


def peak_memory_mb(fn: Callable[[], None], device: str) -> Optional[float]:
    """Memory allocated during one call of ``fn`` above what was allocated before (MB); None on
    the CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


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
    launches: Optional[int] = None
    extra_mem_mb: Optional[float] = None
    kernel_ms: Optional[float] = None  # the device's own time per call (kernel_ms_per_call)


def argument_parser(description: str, full_help: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --device, --full, --only, --backend, --csv."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help=full_help)
    ap.add_argument("--only", default="", help="comma-separated words a case label must contain one of")
    ap.add_argument("--backend", default="", help="fastopt backends, comma-separated (default: all available)")
    ap.add_argument("--csv", default=os.path.join(OUT_DIR, "results.csv"))
    return ap


def selected_backends(args: argparse.Namespace) -> list[str]:
    """--backend, else every fastopt backend available on the device but the reference one."""
    import fastopt

    if args.backend:
        return args.backend.split(",")
    return [b for b in fastopt.available_backends(args.device) if b != "reference"] or ["reference"]


def print_header(env: dict, what: str, backends: list[str]) -> None:
    print(f"# {env['device']} | torch {env['torch']} | cuda {env['cuda']} | triton {env['triton']} | {env['date']}")
    print(f"# {what}; fastopt backends: {', '.join(backends)}", flush=True)


def progress(done: int, total: int, width: int = 20) -> str:
    """A text progress bar, ``[#####---------------] 3/12``, printed with each finished case."""
    filled = round(width * done / max(total, 1))
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}"


def write_csv(rows: list[Row], env: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(env) + list(asdict(rows[0]))
    if os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != fields:  # written by an older harness: kept aside, a new file begins
            os.replace(path, path[:-len(".csv")] + f"-until-{_dt.date.today().isoformat()}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**env, **asdict(row)})


HEADER = ("case", "provider", "median ms", "p20-p80 ms", "GB/s", "% copy BW", "vs best torch", "launches",
          "extra MB", "kernel ms")


def _cells(r: Row) -> tuple[str, ...]:
    return (r.case, r.provider, f"{r.median_ms:.3f}", f"{r.p20_ms:.3f}-{r.p80_ms:.3f}", f"{r.gbs:.1f}",
            f"{r.pct_copy_bw:.0f}%", f"{r.speedup_vs_best_torch:.2f}x",
            "-" if r.launches is None else str(r.launches),
            "-" if r.extra_mem_mb is None else f"{r.extra_mem_mb:.0f}",
            "-" if r.kernel_ms is None else f"{r.kernel_ms:.3f}")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows])


def format_table(rows: list[Row]) -> str:
    lines = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def plot_rows(rows: list[Row], out_dir: str, prefix: str = "") -> list[str]:
    """Two PNGs from the rows: fastopt's speedup over the best torch.optim variant, and % of copy
    bandwidth, per case and provider. Returns the paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cases = list(dict.fromkeys(r.case for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    paths = []
    for metric, title, fname in (
        ("speedup_vs_best_torch", "speedup over the best torch variant (x)", f"{prefix}speedup.png"),
        ("pct_copy_bw", "% of copy bandwidth measured in the same run", f"{prefix}bandwidth.png"),
    ):
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(cases) * max(1, len(providers)) / 2 + 1.5))
        height = 0.8 / len(providers)
        for j, provider in enumerate(providers):
            values = {r.case: getattr(r, metric) for r in rows if r.provider == provider}
            ys = [i + j * height for i, c in enumerate(cases) if c in values]
            ax.barh(ys, [values[c] for c in cases if c in values], height=height, label=provider)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
        ax.set_yticklabels(cases, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.legend(fontsize=8)
        if metric == "speedup_vs_best_torch":
            ax.axvline(1.0, color="black", linewidth=0.8)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
