"""The optimizer step under FSDP2 on the CPU: 2 processes, gloo, DTensor params.

    python benchmarks/bench_fsdp.py --full [--ranks 2]

Times what each rank spends in the optimizer part of a training step, with global-norm clipping:
fastopt.AdamW(max_grad_norm=1.0) (the local shards through the cpu kernels, one all-reduce of the
norm) against torch.optim.AdamW (for-loop and foreach) after torch.nn.utils.clip_grad_norm_ on
the DTensor grads. Both sides see the same sharded model and grads; steps alternate between the
providers (Note [alternate timing], harness.py), a barrier before each timed step, and the median
over rank 0's steps is reported. Runs with --full only (``make bench BENCH_ARGS=--full``): it
starts processes and takes about a minute. Rows go to benchmarks/out/fsdp.csv with device,
versions and date.
"""

from __future__ import annotations

import csv
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastopt  # noqa: E402
from harness import OUT_DIR, argument_parser, environment  # noqa: E402

WIDTH, DEPTH = 1024, 8  # 8 Linear(1024, 1024): 8.4M params, 16 tensors
STEPS = 30


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))  # on the CPU even where there is a GPU
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.randn(8, WIDTH)
        providers = {}
        for name in ("fastopt", "torch for-loop", "torch foreach"):
            model = _model()  # seeded: the same model for each provider (FSDP2 cannot be deep-copied)
            model(x).square().mean().backward()  # grads, kept: every step reuses them
            if name == "fastopt":
                opt = fastopt.AdamW(model.parameters(), lr=1e-4, max_grad_norm=1.0)

                def step(opt=opt):
                    opt.step()
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=name.endswith("foreach"))

                def step(opt=opt, params=list(model.parameters())):
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
            providers[name] = step
        times = {name: [] for name in providers}
        for i in range(STEPS + 3):
            for name, step in providers.items():
                dist.barrier()
                t0 = time.perf_counter()
                step()
                if i >= 3:  # warm-up: state made, plans built
                    times[name].append((time.perf_counter() - t0) * 1e3)
        if rank == 0:
            env = environment("cpu")
            numel = WIDTH * (WIDTH + 1) * DEPTH
            rows = []
            for name, ts in times.items():
                ts.sort()
                rows.append({**env, "case": f"AdamW + clip, FSDP2 {world} ranks, {numel / 1e6:.1f}M params",
                             "provider": name, "median_ms": round(ts[len(ts) // 2], 3),
                             "p20_ms": round(ts[len(ts) // 5], 3), "p80_ms": round(ts[4 * len(ts) // 5], 3)})
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            base_ms = rows[0]["median_ms"]
            print(f"\nFSDP2 on CPU ({world} ranks, gloo), AdamW + global-norm clipping, "
                  f"{numel / 1e6:.1f}M params; {env.get('device', '')}")
            for r in rows:
                print(f"  {r['provider']:<16} {r['median_ms']:8.2f} ms  (p20 {r['p20_ms']:.2f}, p80 {r['p80_ms']:.2f})"
                      f"  {r['median_ms'] / base_ms:5.2f}x fastopt's time")
            print(f"rows: {out}")
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argument_parser(__doc__.splitlines()[0], "run (this benchmark runs with --full only)")
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    if not args.full:
        print("bench_fsdp: skipped (runs with --full: make bench BENCH_ARGS=--full)")
        return
    if not dist.is_available() or not dist.is_gloo_available():
        print("bench_fsdp: skipped (torch.distributed with gloo is not available)")
        return
    mp.spawn(_rank, args=(args.ranks, _port(), os.path.join(OUT_DIR, "fsdp.csv")), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
