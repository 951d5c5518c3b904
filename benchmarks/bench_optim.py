"""Optimizer step time: fastopt against torch.optim (for-loop, foreach, fused) on one device.

    python benchmarks/bench_optim.py [--device cpu|cuda] [--full] [--only Adam,clip] [--backend cpu]

Every case times its providers alternately in one process (Note [alternate timing]) and reports
the median step time with p20/p80, the GB/s of the minimum bytes the step must move (fp32 Adam:
reads p, g, m, v and writes p, m, v = 28 B/param) and that as a % of the copy bandwidth measured in
the same run. Rows go to benchmarks/out/results.csv (device, versions and date on each), a Markdown
report and, when matplotlib is importable, PNG plots.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastopt  # noqa: E402
from harness import (  # noqa: E402
    OUT_DIR, Row, argument_parser, copy_bandwidth_gbs, environment, format_table, kernel_ms_per_call,
    launches_per_call, markdown_table, peak_memory_mb, plot_rows, print_header, progress, runnable, selected_backends,
    time_alternating,
    write_csv,
)

TORCH_FLAGS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@dataclass
class Case:
    """One benchmark case: an optimizer, its options and the work torch.optim does for the same.

    ``recipe`` says what a torch step is: "plain" (``opt.step()``), "clip" (``clip_grad_norm_``
    then the step), "amp_clip" (GradScaler: ``unscale_``, ``clip_grad_norm_``, ``step``,
    ``update``), "master" (an fp32 copy of bf16 params stepped, then copied back to bf16), "loop"
    (``training_loop``: backward, step, zero_grad, for every provider; its launches and kernel ms
    count the backward's too)."""

    name: str  # the optimizer
    sizes: str  # "one", "gpt", "small", "host"
    bytes_per_param: int
    options: dict = field(default_factory=dict)  # torch.optim arguments shared by both sides
    recipe: str = "plain"
    extras: dict = field(default_factory=dict)  # fastopt-only arguments
    tag: str = ""
    full_only: bool = False
    # (label, fastopt extras) of today's mode, timed beside the case's in the same alternation
    # ("fastopt <backend> <label>"), with the state bytes per param of both; None: none
    beside: Optional[tuple[str, dict]] = None
    # params, and grads, are views of one buffer each (a flat model; DDP's gradient_as_bucket_view)
    views: bool = False

    @property
    def label(self) -> str:
        return f"{self.name}{' ' + self.tag if self.tag else ''}"


CASES = [
    *[Case(n, s, b) for n, b in (("Adam", 28), ("AdamW", 28), ("Adagrad", 20), ("RMSprop", 20))
      for s in ("one", "small")],
    Case("RMSprop", "one", 36, {"centered": True, "momentum": 0.9}, tag="centered+momentum"),
    # SGD with momentum moves 20 B/param (reads p, g, buf; writes p, buf)
    *[Case("SGD", s, 20, opts, tag=tag) for tag, opts in (("momentum", {"momentum": 0.9}),
                                                           ("nesterov", {"momentum": 0.9, "nesterov": True}))
      for s in ("one", "small")],
    Case("Adam", "one", 32, recipe="clip", extras={"max_grad_norm": 1.0}, tag="clip"),
    Case("Adam", "one", 32, recipe="amp_clip", extras={"max_grad_norm": 1.0}, tag="GradScaler+clip"),
    Case("Adam", "one", 28, recipe="master", extras={"master_weights": True}, tag="bf16+master"),
    # low-precision state (issue 27): bf16 moments, stochastically rounded; each case also times
    # fastopt's step with its float32 state ("fp32 state") alternately in the same run. fp32
    # params: reads p, g, m, v and writes p, m, v = 4+4+2+2 + 4+2+2 = 20 B/param (28 with fp32
    # state); bf16 params with fp32 masters: master, g, m, v, then master, m, v, p = 20 B (28)
    *[Case("AdamW", s, 20, extras={"state_dtype": torch.bfloat16}, tag="bf16 state",
           beside=("fp32 state", {})) for s in ("one", "small")],
    Case("AdamW", "one", 20, recipe="master", extras={"master_weights": True, "state_dtype": torch.bfloat16},
         tag="bf16+master, bf16 state", beside=("fp32 state", {"master_weights": True})),
    # bf16 params without masters (compensation, Note [param store]) against today's bf16 +
    # fp32 masters (28 B): kahan reads p, c, g, m, v and writes p, c, m, v = 18 B/param;
    # stochastic reads p, g, m, v and writes p, m, v = 14 B/param
    *[Case("AdamW", "one", b, recipe="master", extras={"compensation": c, "state_dtype": torch.bfloat16},
           tag=f"bf16 {c}, bf16 state", beside=("bf16+master", {"master_weights": True}))
      for c, b in (("kahan", 18), ("stochastic", 14))],
    # the host's work per step, where the arithmetic is nothing: 4,000 one-element params, their
    # grads kept between steps; then in a training loop (grads made by each backward, freed by
    # zero_grad), where every provider also pays the same backward
    Case("AdamW", "host", 28, tag="host cost"),
    Case("AdamW", "host", 28, recipe="loop", tag="host cost, backward+step+zero_grad"),
    # issue 29's measures: the host cost of one one-element param (the x5 goal's unit), of 4,000
    # whose params and grads are views of one buffer each, and 2,000 x 1,000 laid out so
    Case("AdamW", "host1", 28, tag="host cost, one param"),
    Case("AdamW", "host", 28, views=True, tag="host cost, views of one buffer"),
    Case("AdamW", "small", 28, views=True, tag="views of one buffer"),
    Case("AdamW", "small1", 28, tag="one tensor, the small sets' size"),
    *[Case(n, "gpt", b, full_only=True) for n, b in (("Adam", 28), ("AdamW", 28))],
    Case("AdamW", "gpt", 32, recipe="clip", extras={"max_grad_norm": 1.0}, tag="clip", full_only=True),
]


def gpt_shapes(d: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """A GPT-style parameter set: embedding, per layer q/k/v/o and MLP matrices, LayerNorm weights
    and biases (12 tensors a layer), and a final LayerNorm."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(4 * d, d), (4 * d,), (d, 4 * d), (d,)] + [(d,)] * 4
    return shapes + [(d,), (d,)]


def shapes_for(sizes: str, device: str, full: bool) -> list[tuple[int, ...]]:
    gpu = device == "cuda"
    if sizes == "one":
        return [((256 << 20) if full else (64 << 20),)] if gpu else [(10_000_000,)]
    if sizes == "host":
        return [(1,)] * 4000
    if sizes == "host1":
        return [(1,)]
    if sizes == "small1":  # as many elements as "small", in one tensor (issue 29's unit)
        return [(4096 * 4000,)] if gpu else [(2_000_000,)]
    if sizes == "small":
        return [(4096,)] * 4000 if gpu else [(1000,)] * 2000
    # ~300 tensors: 24 layers; 351M params on a GPU, 20M on the CPU
    return gpt_shapes(1024, 24, 50304) if gpu else gpt_shapes(256, 24, 8192)


def _params(shapes, device, dtype=torch.float32, views: bool = False) -> list[torch.nn.Parameter]:
    if not views:
        params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        return params
    numels = [math.prod(s) for s in shapes]
    data, grads = (torch.randn(sum(numels), device=device, dtype=dtype) for _ in range(2))
    params = [torch.nn.Parameter(d.view(s)) for d, s in zip(data.split(numels), shapes)]
    for p, g, s in zip(params, (grads * 1e-2).split(numels), shapes):
        p.grad = g.view(s)
    return params


def _scaler(device: str) -> torch.amp.GradScaler:
    """A GradScaler as a training loop has it after ``scaler.scale(loss)``. init_scale=1: the
    unscale does its full pass but leaves the grads as they are from step to step."""
    scaler = torch.amp.GradScaler(device, init_scale=1.0, growth_interval=1 << 30)
    scaler.scale(torch.ones((), device=device))  # creates the scale tensor, as scale(loss) does
    return scaler


def training_loop(params: list[torch.nn.Parameter], opt) -> Callable[[], None]:
    """backward (one stack of the same-shaped params: a fresh grad tensor per param, as autograd
    makes them), step, zero_grad (set_to_none: the grads are freed)."""
    weights = torch.randn(len(params), device=params[0].device)

    def step():
        (torch.stack(params).flatten() * weights).sum().backward()
        opt.step()
        opt.zero_grad()
    return step


def torch_step(case: Case, variant: str, shapes, device) -> Callable[[], None]:
    cls = getattr(torch.optim, case.name)
    flags = TORCH_FLAGS[variant]
    if case.recipe == "master":
        low = _params(shapes, device, torch.bfloat16)
        master = [torch.nn.Parameter(p.detach().float()) for p in low]
        opt = cls(master, lr=1e-3, **case.options, **flags)

        def step():
            for m, p in zip(master, low):
                m.grad = p.grad.float()
            opt.step()
            torch._foreach_copy_([p.data for p in low], [m.data for m in master])
        return step
    params = _params(shapes, device, views=case.views)
    opt = cls(params, lr=1e-3, **case.options, **flags)
    if case.recipe == "plain":
        return opt.step
    if case.recipe == "loop":
        return training_loop(params, opt)
    norm_flags = {"foreach": variant != "for-loop"}
    if case.recipe == "clip":
        def step():
            torch.nn.utils.clip_grad_norm_(params, 1.0, **norm_flags)
            opt.step()
        return step
    scaler = _scaler(device)

    def step():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0, **norm_flags)
        scaler.step(opt)
        scaler.update()
    return step


def fastopt_step(case: Case, backend: str, shapes, device, extras=None) -> Callable[[], None]:
    cls = getattr(fastopt, case.name)
    dtype = torch.bfloat16 if case.recipe == "master" else torch.float32
    params = _params(shapes, device, dtype, views=case.views)
    opt = cls(params, lr=1e-3, backend=backend, **case.options, **(case.extras if extras is None else extras))
    if case.recipe == "loop":
        return training_loop(params, opt)
    if case.recipe != "amp_clip":
        return opt.step
    scaler = _scaler(device)

    def step():
        scaler.step(opt)
        scaler.update()
    return step


def state_bytes_note(case: Case, backend: str, device: str) -> str:
    """Bytes of optimizer state per param (state tensors, master copies and compensation buffers,
    from the tensors a step made), with the case's extras and with today's mode beside it."""
    per_param = {}
    for label, extras in (("case", case.extras), case.beside):
        p = _params([(1000,)], device, torch.bfloat16 if case.recipe == "master" else torch.float32)
        opt = getattr(fastopt, case.name)(p, lr=1e-3, backend=backend, **case.options, **extras)
        opt.step()
        state = opt.state[p[0]].values()
        per_param[label] = sum(t.numel() * t.element_size() for t in state if t.numel() == 1000) / 1000
    return (f"{case.label} ({backend}): state bytes per param {per_param['case']:g}, "
            f"{per_param[case.beside[0]]:g} with {case.beside[0]} (step counts and seeds aside); GB/s of "
            "both rows count the case's bytes")


def torch_alternatives(case: Case, shapes, device: str, notes: set) -> dict[str, Callable[[], None]]:
    """What a user could pick instead of fastopt, for plain and clipped fp32 steps:
    - "torch compiled foreach": ``torch.compile`` of AdamW's foreach step (and of clip_grad_norm_):
      Inductor fuses it into a few kernels. Compiling takes minutes for thousands of tensors, so
      only sets of up to 400 tensors, and on the CPU only the one-tensor case.
    - "torch fused flat": torch's fused optimizer on one flat parameter holding all the params
      (what a flat parameter buffer, as in Megatron or FSDP1, gives): one tensor, no per-tensor
      cost, where torch has a fused implementation for the device."""
    out: dict[str, Callable[[], None]] = {}
    if case.recipe not in ("plain", "clip") or "state_dtype" in case.extras:
        return out
    cls = getattr(torch.optim, case.name)
    if case.name != "AdamW":
        pass  # compiled for AdamW only: each compile takes a minute of the GPU suite's few
    elif len(shapes) <= 400 and (device == "cuda" or len(shapes) == 1):
        params = _params(shapes, device)
        opt = cls(params, lr=1e-3, **case.options, foreach=True)

        def eager():
            if case.recipe == "clip":
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
        out["torch compiled foreach"] = torch.compile(eager)
    else:
        notes.add("torch compiled foreach: timed for sets of up to 400 tensors (on the CPU: one tensor), "
                  "its compile time grows with the tensor count")
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in _params(shapes, device)]))
    flat.grad = torch.randn_like(flat) * 1e-2
    try:
        flat_opt = cls([flat], lr=1e-3, **case.options, fused=True)
    except (RuntimeError, ValueError, TypeError) as exc:  # no fused implementation for it
        notes.add(f"torch fused flat: no {case.name}(fused=True) on {device}: {str(exc).splitlines()[0][:120]}")
        return out

    def flat_step():
        if case.recipe == "clip":
            torch.nn.utils.clip_grad_norm_([flat], 1.0)
        flat_opt.step()
    out["torch fused flat"] = flat_step
    return out


# Peers, timed where importable (none is installed by `make bench`): provider -> (module, the
# class for each optimizer, the devices it runs on).
PEERS = {
    "bitsandbytes 32-bit": ("bitsandbytes.optim", {"Adam": "Adam32bit", "AdamW": "AdamW32bit",
                                                   "Adagrad": "Adagrad32bit", "RMSprop": "RMSprop32bit"}, ("cuda",)),
    "torchao": ("torchao.optim", {"AdamW": "_AdamW"}, ("cuda",)),
    "torch-optimi": ("optimi", {"Adam": "Adam", "AdamW": "AdamW"}, ("cpu", "cuda")),
}


def peer_steps(case: Case, shapes, device: str, notes: set) -> dict[str, Callable[[], None]]:
    """Steps of the peers that implement the case (plain fp32 steps only); a one-line note for
    each peer that is not importable."""
    import importlib

    out = {}
    if "compensation" in case.extras:
        return low_precision_peers(case, shapes, device, notes)
    if case.recipe != "plain" or case.options or "state_dtype" in case.extras:
        return out
    for provider, (module, classes, devices) in PEERS.items():
        if device not in devices or case.name not in classes:
            continue
        try:
            cls = getattr(importlib.import_module(module), classes[case.name])
        except (ImportError, AttributeError) as exc:
            notes.add(f"{provider} skipped: {str(exc).splitlines()[0]}")
            continue
        out[provider] = cls(_params(shapes, device), lr=1e-3).step
    return out


def low_precision_peers(case: Case, shapes, device: str, notes: set) -> dict[str, Callable[[], None]]:
    """The peers of bf16 params without master weights (issue 27): optimi's AdamW with
    kahan_sum=True (its state in the params' dtype, bf16) beside compensation="kahan", torchao's
    _AdamW(bf16_stochastic_round=True) beside "stochastic"; a note for each one that is not
    importable or does not run here."""
    import importlib

    peers = {"kahan": ("torch-optimi kahan_sum", "optimi", "AdamW", {"kahan_sum": True}),
             "stochastic": ("torchao bf16_stochastic_round", "torchao.optim", "_AdamW",
                            {"bf16_stochastic_round": True})}
    provider, module, name, kwargs = peers[case.extras["compensation"]]
    try:
        cls = getattr(importlib.import_module(module), name)
        opt = cls(_params(shapes, device, torch.bfloat16), lr=1e-3, **kwargs)
        opt.step()  # it runs here (torchao compiles its step on first use)
    except Exception as exc:  # an optional peer: whatever stops it is reported, not raised
        notes.add(f"{provider} skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return {}
    return {provider: opt.step}


def torch_variants(case: Case, device: str) -> list[str]:
    """torch.optim's implementations of the case's optimizer that run on ``device``."""
    out = []
    for variant, flags in TORCH_FLAGS.items():
        try:
            getattr(torch.optim, case.name)([torch.zeros(1, device=device, requires_grad=True)], **flags)
        except (RuntimeError, ValueError, TypeError):  # not built for the device, or no such flag
            continue
        out.append(variant)
    return out


def main() -> None:
    args = argument_parser(__doc__.splitlines()[0], "larger sizes and the GPT-style parameter set").parse_args()
    backends = selected_backends(args)
    cases = [c for c in CASES if args.full or not c.full_only]
    if args.only:
        words = args.only.split(",")
        cases = [c for c in cases if any(w in f"{c.label} {c.sizes}" for w in words)]
    env = environment(args.device)
    print_header(env, "optimizer steps", backends)

    rows: list[Row] = []
    notes: set[str] = set()
    copy_bw: dict[int, float] = {}
    for i, case in enumerate(cases):
        first_row = len(rows)
        shapes = shapes_for(case.sizes, args.device, args.full)
        numel = sum(torch.Size(s).numel() for s in shapes)
        if numel not in copy_bw:  # a copy moving as many bytes as an fp32 Adam step
            copy_bw[numel] = copy_bandwidth_gbs(numel * 14, args.device)
        label = f"{case.label}, {len(shapes)} tensors, {numel / 1e6:.1f}M"
        steps: dict[str, Callable[[], None]] = {}
        for variant in torch_variants(case, args.device):
            steps[f"torch {variant}"] = torch_step(case, variant, shapes, args.device)
        for backend in backends:
            steps[f"fastopt {backend}"] = fastopt_step(case, backend, shapes, args.device)
            if case.beside is not None:  # today's mode beside it, in the same alternation
                steps[f"fastopt {backend} {case.beside[0]}"] = fastopt_step(case, backend, shapes, args.device,
                                                                            case.beside[1])
                notes.add(state_bytes_note(case, backend, args.device))
            if len(shapes) > 1 and case.recipe == "plain" and not case.extras:
                # the same elements in one tensor, in the same alternation: issue 29's unit (many
                # tensors at the speed of one; and the host cost of one param for the host rows)
                steps[f"fastopt {backend} one tensor"] = fastopt_step(case, backend, [(numel,)], args.device)
        steps.update(torch_alternatives(case, shapes, args.device, notes))
        steps.update(peer_steps(case, shapes, args.device, notes))
        steps = runnable(steps, notes)
        timings = time_alternating(steps, args.device)
        # against torch.optim as people call it (the alternatives are reported beside, not in it)
        best_torch = min(t.median_ms for p, t in timings.items() if p.removeprefix("torch ") in TORCH_FLAGS)
        for provider, t in timings.items():
            gbs = numel * case.bytes_per_param / (t.median_ms * 1e-3) / 1e9
            rows.append(Row(
                label, provider, t.median_ms, t.p20_ms, t.p80_ms, gbs, 100 * gbs / copy_bw[numel],
                best_torch / t.median_ms, launches_per_call(steps[provider], args.device),
                peak_memory_mb(steps[provider], args.device), kernel_ms_per_call(steps[provider], args.device),
            ))
        del steps
        print(f"# {progress(i + 1, len(cases))} {label}: copy {copy_bw[numel]:.1f} GB/s; "
              + ", ".join(f"{p} {t.median_ms:.3f} ms" for p, t in timings.items()), flush=True)
        write_csv(rows[first_row:], env, args.csv)  # per case: a run cut short keeps its rows

    for note in sorted(notes):
        print(f"# {note}")
    report_notes = "".join(f"- {note}\n" for note in sorted(notes))
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "report.md"), "w") as f:
        f.write(f"# fastopt optimizer step times\n\n{env['device']}; torch {env['torch']}, CUDA "
                f"{env['cuda']}, Triton {env['triton']}; {env['date']}\n\n"
                f"Command: `python benchmarks/bench_optim.py {' '.join(sys.argv[1:])}`. Times are "
                "medians (p20-p80) of steps timed alternately with the other providers (on a GPU: CUDA "
                "events around the Python call, so the host's time shows where the GPU waits for it; "
                "kernel ms is the GPU's own time per step, from the profiler); GB/s counts "
                "the minimum bytes a step moves; % copy BW is against the copy bandwidth measured "
                "in the same run (on a CPU a copy also pays a read-for-ownership of its destination, "
                "which an in-place update does not, so more than 100% is possible); vs best torch is "
                "the best torch.optim variant's median over this one's.\n\n")
        f.write(markdown_table(rows) + "\n")
        if report_notes:
            f.write("\nNotes:\n\n" + report_notes)
    plots = plot_rows(rows, OUT_DIR)
    print()
    print(format_table(rows))
    print(f"\nrows appended to {os.path.relpath(args.csv)}; report in {os.path.relpath(OUT_DIR)}/report.md"
          + (f"; plots: {', '.join(os.path.relpath(p) for p in plots)}" if plots else " (no matplotlib: no plots)"))


if __name__ == "__main__":
    main()
