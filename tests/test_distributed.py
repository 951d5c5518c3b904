"""fastopt under torch.distributed on this machine's CPU: the gloo backend, 2 processes.

FSDP2 (``fully_shard``) makes every param a DTensor holding this rank's shard. Such a tensor has
no memory of its own for a kernel to walk; before this test existed, the first step of any
fastopt optimizer handed it to the compiled code and the process died with a segfault. Each
case runs fastopt and torch.optim side by side in the same processes and compares them.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import faulthandler
import gc
import os
import socket
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastopt
from conftest import backend_params

WORLD = 2
# A rank's time limit: above gloo's own (5 minutes), below make test's per-test limit (600 s).
_RANK_TIMEOUT_S = 450
# Norms: one fp32 reduction of the same grads in another order (a few ulps).
RTOL, ATOL = 1e-5, 1e-6
# Note [open-loop parity]: each step both optimizers update from the same grad values: fastopt's
# grads, made by autograd through FSDP2/DDP (what the plan binds: DTensors, bucket views), are
# overwritten in place with torch's (_same_grads). Compared closed-loop (each model its own grads)
# an ulp of difference in a param changes the next grads and grows with every step: a ReLU
# net's grad that sums contributions of both signs to ~0 has no relative accuracy at all. What is
# left is rounding: in a step each op of a rule may round an ulp apart from torch's (torch's CPU
# sqrt is not always correctly rounded, e.g. on AMD CPUs; Triton fuses where torch's CUDA kernels
# do), and the difference grows at most linearly with the steps, in units of the tensor's own
# scale rather than of each element (RMSprop's momentum buffer adds terms of up to
# 1/sqrt(1 - alpha) that can cancel to a small value). So |ours - torch| <= ULPS_PER_STEP * steps
# * eps(dtype) * max|torch's tensor|; measured here: at most 0.7 ulp per step (30 seeds, 4 and 20
# steps, every rule, cpu and triton), 4 leaves room and still fails any wrong formula by orders.
ULPS_PER_STEP = 4


def _same_grads(ours_m, theirs_m) -> None:
    """Note [open-loop parity]: ours' grads get torch's values, in place (local shards of DTensors)."""
    with torch.no_grad():
        for p, q in zip(ours_m.parameters(), theirs_m.parameters()):
            g, h = p.grad, q.grad
            (g.to_local() if hasattr(g, "to_local") else g).copy_(h.to_local() if hasattr(h, "to_local") else h)


def _assert_scaled(actual, expected, steps: int, what: str = "") -> None:
    """Note [open-loop parity]: close in units of the expected tensor's scale."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in (actual, expected)]
    a, e = (t.detach().double() for t in local)
    if e.numel() == 0:
        return
    bound = ULPS_PER_STEP * steps * torch.finfo(local[1].dtype).eps * e.abs().max().item()
    err = (a - e).abs().max().item()
    assert err <= bound, f"{what}: max difference {err:.3g} > {bound:.3g} ({ULPS_PER_STEP} ulps of its scale per step)"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn, port: int, *args) -> None:
    """One rank's process: ``fn(rank, port, *args)``, then the exit of Note [a rank's exit].

    Note [a rank's exit]: a rank that returned normally could still die afterwards with SIGABRT
    ("terminate called without an active exception"; CI saw it at world 2 and world 4 of the DCP
    tests, after the ranks had met at the closing barrier): FSDP2's modules hold reference cycles
    (hooks, device meshes) that keep tensors and the gloo process group alive until the garbage
    collection of interpreter shutdown, and a gloo worker thread that drops a tensor then must take
    the GIL, which a finalizing interpreter answers with pthread_exit, whose unwinding through a
    noexcept frame is std::terminate (torch's own issue, pytorch PR 179291). So the cycles are
    collected here, while the interpreter is whole, and the process then ends without finalizing
    (its output flushed; a failing ``fn`` raises before this and is reported by mp.spawn as usual).

    A rank that hangs (a deadlock: Note [DDP models die before their process group]) prints every
    thread's Python stack and exits after _RANK_TIMEOUT_S, so that mp.spawn fails the test with the
    hanging rank named, before pytest-timeout would end the whole test process."""
    faulthandler.dump_traceback_later(_RANK_TIMEOUT_S, exit=True)
    fn(rank, port, *args)
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, *args, world: int = WORLD) -> None:
    """Run ``fn(rank, port, *args)`` in ``world`` fresh processes; a failure in any rank fails the
    test with that rank's traceback."""
    mp.spawn(_rank_main, args=(fn, _free_port(), *args), nprocs=world, join=True)


@contextlib.contextmanager
def _process_group(rank: int, port: int, world: int = WORLD, backend: str = "gloo"):
    """One rank's process group for the body. On success every rank meets at a barrier before the
    group is destroyed, so that no rank tears gloo down while a peer's last sends (the all-gather of
    ``full_tensor()``, DCP's collectives) are in flight. (The SIGABRT this was first written against
    came later, at the process's exit: Note [a rank's exit].) After a failure there is no barrier
    (the peers may never reach it): the group is destroyed and the error raised."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 16 rows shard evenly over 2 ranks; 5 rows (and the 5-element bias) do not: rank 1 holds a
    # padded, uneven shard
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def _shard(model: torch.nn.Module, mixed_precision: bool = False, device: str = "cpu") -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the mesh named: FSDP2's default mesh is on the accelerator when there is one (a GPU machine
    # would move these CPU tests' models there)
    kw = {"mesh": init_device_mesh(device, (dist.get_world_size(),))}
    if mixed_precision:  # FSDP2's mixed precision: bf16 compute, fp32 reduce-scatter, fp32 sharded params
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


_OPTIMIZERS = {
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Adam": dict(lr=1e-2, amsgrad=True),
    "Adagrad": dict(lr=0.1),
    "RMSprop": dict(lr=1e-2, momentum=0.9, centered=True),
    "SGD": dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
}


def _fsdp_parity(rank: int, port: int, cases: list, backend: str) -> None:
    with _process_group(rank, port):
        for name, max_norm, mixed_precision in cases:
            _fsdp_case(rank, name, backend, max_norm, mixed_precision)


def _fsdp_case(rank: int, name: str, backend: str, max_norm, mixed_precision: bool, device: str = "cpu") -> None:
    base = _model().to(device)
    ours_m, theirs_m = (_shard(copy.deepcopy(base), mixed_precision, device),
                        _shard(copy.deepcopy(base), mixed_precision, device))
    kwargs = _OPTIMIZERS[name]
    extras = {} if max_norm is None else {"max_grad_norm": max_norm}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = getattr(fastopt, name)(ours_m.parameters(), backend=backend, **kwargs, **extras)
        theirs = getattr(torch.optim, name)(theirs_m.parameters(), foreach=False, **kwargs)
        torch.manual_seed(100 + rank)  # each rank its own data, as in training
        steps = 4
        for step in range(steps):
            x = torch.randn(6, 8).to(device)
            for m in (ours_m, theirs_m):
                m(x).square().mean().backward()
            _same_grads(ours_m, theirs_m)
            if max_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(theirs_m.parameters(), max_norm)
            theirs.step()
            ours.step()
            stats = ours.step_stats
            # the local shards through the backend's kernels (Note [DTensor shards])
            expected = (0, 4) if backend == "reference" else (4, 0)
            assert (stats.kernel, stats.reference) == expected, stats
            if max_norm is not None:
                got = ours.last_grad_norm
                got = got.full_tensor() if hasattr(got, "full_tensor") else got
                want = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
            for opt in (ours, theirs):
                opt.zero_grad()
    assert not any("reference path" in str(w.message) for w in caught), [str(w.message) for w in caught]
    for (n, p), q in zip(ours_m.named_parameters(), theirs_m.parameters()):
        assert type(p).__name__ == "DTensor"
        _assert_scaled(p, q, steps, f"{name} {n}")
        for key, value in theirs.state[q].items():
            mine = ours.state[p][key]
            if key == "step":
                assert float(mine) == float(value)
            else:
                _assert_scaled(mine, value, steps, f"{name} {n} {key}")


@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_fsdp2_dtensor_params_step_like_torch(backend):
    """#14 item 7 and #17: DTensor params never reach the compiled code as DTensors (the first
    step segfaulted); every optimizer steps their local shards through the backend's kernels
    (asserted) like torch.optim, also under FSDP2's mixed precision (bf16 compute); max_grad_norm
    over DTensor grads is the norm over every rank's shard, as clip_grad_norm_ computes it. (One
    spawn per backend: starting a process group costs seconds.)"""
    cases = [(name, None, False) for name in sorted(_OPTIMIZERS)] + [("AdamW", 0.05, False), ("Adam", 0.05, True)]
    _spawn(_fsdp_parity, cases, backend)


def _entry_points_refuse_dtensors(rank: int, port: int) -> None:
    with _process_group(rank, port):
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        d = [distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]) for _ in range(4)]
        plain = [torch.randn(4, 4) for _ in range(4)]
        steps = [torch.zeros(()) for _ in range(1)]
        C = fastopt._ext._C
        # a plan built from DTensors, or bound to DTensor owners: each list is checked
        for lists, owners in (((d[0:1], d[1:2], d[2:3], d[3:4]), plain[:1]),
                              ((plain[0:1], plain[1:2], plain[2:3], plain[3:4]), d[:1])):
            p, g, m, v = lists
            with pytest.raises(RuntimeError, match="not a plain dense tensor"):
                C.cpu_plan("adam", [p, g, m, v, [], []], steps, owners)
        # the registered ops (bn_relu calls one): DTensor's own dispatch refuses an op it has no
        # rule for, before our kernels see it
        with pytest.raises(NotImplementedError, match="sharding strategy"):
            C.bn_relu(d[0], None, None, None, None, True, 0.1, 1e-5)
        with pytest.raises(NotImplementedError, match="sharding strategy"):
            torch.ops.fastopt.multi_tensor_norm(d, 2.0, None, None)

        # a DTensor param whose grad is laid out otherwise (Replicate for a Shard(0) param): its
        # shards do not correspond, so it takes the reference rules (warned, counted), like torch
        from torch.distributed.tensor import Replicate

        torch.manual_seed(0)
        full, grad = torch.randn(8, 4), torch.randn(8, 4)
        ours = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        theirs = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        opt = fastopt.Adam([ours], lr=0.1, backend="cpu")
        ref = torch.optim.Adam([theirs], lr=0.1, foreach=False)
        for step in range(2):
            ours.grad = distribute_tensor(grad, mesh, [Replicate()])
            theirs.grad = distribute_tensor(grad, mesh, [Replicate()])
            if step == 0:  # warned when the plan is made
                with pytest.warns(UserWarning, match="reference path"):
                    opt.step()
            else:
                opt.step()
            ref.step()
            assert (opt.step_stats.kernel, opt.step_stats.reference) == (0, 1), opt.step_stats
        torch.testing.assert_close(ours.full_tensor(), theirs.full_tensor(), rtol=RTOL, atol=ATOL)

        # with clipping, next to a plain param (another bucket): the norms combine
        plain, plain_ref = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        opt = fastopt.Adam([ours, plain], lr=0.1, backend="cpu", max_grad_norm=0.5)
        ref = torch.optim.Adam([theirs, plain_ref], lr=0.1, foreach=False)
        ours.grad, theirs.grad = (distribute_tensor(grad, mesh, [Replicate()]) for _ in range(2))
        plain.grad, plain_ref.grad = torch.full((3,), 2.0), torch.full((3,), 2.0)
        with pytest.warns(UserWarning, match="reference path"):
            opt.step()
        # (torch's clip_grad_norm_ refuses this mix of DTensor and plain grads: by hand)
        norm = torch.linalg.vector_norm(torch.stack([grad.norm(), plain_ref.grad.norm()]))
        coef = torch.clamp(0.5 / (norm + 1e-6), max=1.0)
        theirs.grad.mul_(coef)
        plain_ref.grad.mul_(coef)
        ref.step()
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours.full_tensor(), theirs.full_tensor(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(plain, plain_ref, rtol=RTOL, atol=ATOL)

        # GradScaler's inf skip decided over every rank: only rank 0 found an inf, both skip
        p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        opt = fastopt.AdamW([p], lr=0.1, backend="cpu")
        p.grad = distribute_tensor(grad, mesh, [Shard(0)])
        opt.grad_scale = torch.ones(())
        opt.found_inf = torch.full((), 1.0 if rank == 0 else 0.0)
        before = p.to_local().clone()
        opt.step()
        assert opt.step_stats.kernel == 1
        assert torch.equal(p.to_local(), before), f"rank {rank} stepped while rank 0 skipped"
        assert float(opt.state[p]["step"]) == 0.0
        opt.found_inf = torch.zeros(())
        opt.step()
        assert not torch.equal(p.to_local(), before)


def test_the_compiled_entry_points_refuse_dtensors():
    """Users can call the plans and ops directly: a DTensor there is a clear error, not a read
    through a pointer that is not its elements. And a DTensor param the kernels cannot step by
    its shards falls back to the reference rules, visibly; GradScaler's skip is decided over
    every rank (#17)."""
    if not fastopt._ext.has_cpu_ops():
        pytest.skip("the extension is not built")
    _spawn(_entry_points_refuse_dtensors)


def _ddp_parity(rank: int, port: int, backend: str) -> None:
    """Note [DDP models die before their process group]: a DDP module's Reducer holds a reference to
    the process group, and pybind frees a Reducer with the GIL held. Were it the group's last
    reference (a model still alive after ``destroy_process_group``), ~ProcessGroupGloo would join its
    worker thread while that thread, finishing the closing barrier's work, waits for the GIL to drop
    a Python object of the work's thread-local state: a deadlock (seen here under torch 2.13: the
    rank hung until pytest-timeout ended the test process). So each case's models live in
    ``_ddp_case``'s frame and are collected while the group is whole; the group is then destroyed
    from Python, whose holder releases the GIL."""
    with _process_group(rank, port):
        for name in sorted(_OPTIMIZERS):
            for options in (dict(gradient_as_bucket_view=True), dict(gradient_as_bucket_view=True, static_graph=True),
                            dict()):
                _ddp_case(rank, name, options, backend)
        gc.collect()


def _ddp_case(rank: int, name: str, options: dict, backend: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    base = _model()
    ours_m, theirs_m = DDP(copy.deepcopy(base), **options), DDP(copy.deepcopy(base), **options)
    ours = getattr(fastopt, name)(ours_m.parameters(), backend=backend, max_grad_norm=0.5, **_OPTIMIZERS[name])
    theirs = getattr(torch.optim, name)(theirs_m.parameters(), foreach=False, **_OPTIMIZERS[name])
    torch.manual_seed(100 + rank)
    steps = 4
    for step in range(steps):
        x = torch.randn(6, 8)
        for m in (ours_m, theirs_m):
            m(x).square().mean().backward()
        _same_grads(ours_m, theirs_m)
        norm = torch.nn.utils.clip_grad_norm_(theirs_m.parameters(), 0.5)
        theirs.step()
        ours.step()
        stats = ours.step_stats
        expected = (0, 4) if backend == "reference" else (4, 0)
        assert (stats.kernel, stats.reference) == expected, (name, options, stats)
        torch.testing.assert_close(ours.last_grad_norm, norm, rtol=RTOL, atol=ATOL)
        # set_to_none alternately: DDP then makes the grads bucket views again
        for opt in (ours, theirs):
            opt.zero_grad(set_to_none=step % 2 == 0)
    for p, q in zip(ours_m.parameters(), theirs_m.parameters()):
        _assert_scaled(p, q, steps, f"{name} {options}")


@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_ddp_steps_like_torch_on_the_kernels(backend):
    """#17: DDP-wrapped models, grads as views into DDP's buckets (gradient_as_bucket_view, with and
    without static_graph) or not: every optimizer with clipping on the backend's kernels (asserted)
    ends where torch.optim with clip_grad_norm_ ends."""
    _spawn(_ddp_parity, backend)


# -- checkpoints through torch.distributed.checkpoint (DCP), resharded on load -----------------------

_GLOBAL_BATCH = 12  # rows of data per step, split evenly over 1, 2 or 4 ranks


def _dcp_run(rank: int, port: int, world: int, phase: str, kind: str, ckpt: str, out: str, master: bool) -> None:
    """One training run on ``world`` ranks: "save" trains 3 steps, saves a DCP checkpoint and trains
    2 more; "load" restores the checkpoint (another world size, or another optimizer ``kind``)
    and trains the same 2 steps. Rank 0 writes the full params at the end to ``out``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    with _process_group(rank, port, world):
        model = _model()
        if master:
            model = model.to(torch.bfloat16)
        _shard(model)
        kwargs = dict(lr=1e-2, weight_decay=0.1)
        if kind == "fastopt":
            opt = fastopt.AdamW(model.parameters(), backend="cpu", master_weights=master, max_grad_norm=0.5, **kwargs)
        else:
            opt = torch.optim.AdamW(model.parameters(), foreach=False, **kwargs)

        def train(steps):
            for step in steps:
                gen = torch.Generator().manual_seed(step)
                x = torch.randn(_GLOBAL_BATCH, 8, generator=gen, dtype=torch.bfloat16 if master else torch.float32)
                rows = _GLOBAL_BATCH // world
                model(x[rank * rows:(rank + 1) * rows]).float().square().mean().backward()
                if kind == "torch":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
                opt.zero_grad()
                if kind == "fastopt":
                    assert opt.step_stats.kernel == 4 and opt.step_stats.reference == 0, opt.step_stats

        if phase == "save":
            train(range(3))
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=ckpt)
        else:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=ckpt)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
            if master:  # the fp32 masters came from the checkpoint, not from the bf16 params
                assert all(opt.state[p]["master_param"].dtype == torch.float32 for p in model.parameters())
        train(range(3, 5))
        full = {n: p.full_tensor().float() for n, p in model.named_parameters()}
        if master:
            full.update({f"{n}.master": opt.state[p]["master_param"].full_tensor()
                         for n, p in model.named_parameters()})
        if rank == 0:
            torch.save(full, out)


def _dcp(world, phase, kind, ckpt, out, master=False):
    _spawn(_dcp_run, world, phase, kind, str(ckpt), str(out), master, world=world)


@pytest.mark.slow
@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master-weights"])
def test_dcp_checkpoint_reshards_and_training_continues(tmp_path, master):
    """#17: a checkpoint of fastopt's state (master weights included) saved on 2 ranks loads on 2,
    1 and 4 (DCP reshards the DTensor state), and the next steps equal the uninterrupted run's:
    bit for bit on 2 ranks, to the rounding of another reduction order on 1 and 4."""
    if not fastopt._ext.has_cpu_ops():
        pytest.skip("the extension is not built")
    _dcp(2, "save", "fastopt", tmp_path / "ckpt", tmp_path / "uninterrupted.pt", master)
    expected = torch.load(tmp_path / "uninterrupted.pt")
    for world in (2, 1, 4):
        _dcp(world, "load", "fastopt", tmp_path / "ckpt", tmp_path / f"resumed{world}.pt", master)
        got = torch.load(tmp_path / f"resumed{world}.pt")
        assert got.keys() == expected.keys()
        for n in expected:
            if world == 2:  # the same ranks, the same reductions: the same bits
                assert torch.equal(got[n], expected[n]), f"world 2, {n}"
                continue
            # Other world sizes reduce the grads in another order. fp32: rounding of fp32 sums.
            # bf16 compute: the grads differ by up to a bf16 ulp (2^-8 relative), which two AdamW
            # steps of lr 1e-2 carry into the fp32 masters as up to ~1e-4; the bf16 params are the
            # masters rounded, so they may sit one bf16 ulp apart.
            tol = dict(rtol=1e-5, atol=1e-5)
            if master:
                tol = dict(rtol=1e-3, atol=2e-4) if n.endswith(".master") else dict(rtol=8e-3, atol=8e-3)
            torch.testing.assert_close(got[n], expected[n], **tol, msg=lambda m: f"world {world}, {n}: {m}")


@pytest.mark.slow
def test_dcp_checkpoints_move_between_torch_and_fastopt(tmp_path):
    """A DCP checkpoint of torch.optim's AdamW loads into fastopt's and the other way round; each
    continues as the optimizer that saved it would have."""
    if not fastopt._ext.has_cpu_ops():
        pytest.skip("the extension is not built")
    for saver, loader in (("torch", "fastopt"), ("fastopt", "torch")):
        d = tmp_path / f"{saver}-to-{loader}"
        _dcp(2, "save", saver, d / "ckpt", d / "saver.pt")
        _dcp(2, "load", loader, d / "ckpt", d / "loader.pt")
        expected, got = torch.load(d / "saver.pt"), torch.load(d / "loader.pt")
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{saver}->{loader} {n}: {m}")


def _hsdp_parity(rank: int, port: int) -> None:
    """HSDP on 4 ranks: a (2, 2) mesh, params Replicate on dim 0 and Shard(0) on dim 1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with _process_group(rank, port, world=4):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        models = []
        for _ in range(2):
            m = _model()
            for layer in m:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            models.append(fully_shard(m, mesh=mesh))
        ours_m, theirs_m = models
        placements = next(ours_m.parameters()).placements
        assert placements[0].is_replicate() and placements[1].is_shard(), placements
        ours = fastopt.AdamW(ours_m.parameters(), lr=1e-2, backend="cpu", max_grad_norm=0.05)
        theirs = torch.optim.AdamW(theirs_m.parameters(), lr=1e-2, foreach=False)
        torch.manual_seed(100 + rank)
        steps = 3
        for _ in range(steps):
            x = torch.randn(6, 8)
            for m in (ours_m, theirs_m):
                m(x).square().mean().backward()
            _same_grads(ours_m, theirs_m)
            norm = torch.nn.utils.clip_grad_norm_(theirs_m.parameters(), 0.05)
            theirs.step()
            ours.step()
            assert (ours.step_stats.kernel, ours.step_stats.reference) == (4, 0), ours.step_stats
            # the replicated dim holds copies: counted once, as clip_grad_norm_ counts them
            torch.testing.assert_close(ours.last_grad_norm, norm.full_tensor(), rtol=RTOL, atol=ATOL)
            ours.zero_grad()
            theirs.zero_grad()
        for p, q in zip(ours_m.parameters(), theirs_m.parameters()):
            _assert_scaled(p, q, steps, "HSDP AdamW")


def test_hsdp_clipping_counts_replicated_shards_once():
    """#17: HSDP (a 2-D mesh, params replicated on one dim and sharded on the other) on the cpu
    kernels: the global norm reduces over the shard dim only and equals clip_grad_norm_'s."""
    if not fastopt._ext.has_cpu_ops():
        pytest.skip("the extension is not built")
    _spawn(_hsdp_parity, world=4)


def _nccl_single_rank(rank: int, port: int, backend: str) -> None:
    torch.cuda.set_device(0)
    with _process_group(0, port, 1, backend="nccl"):
        for name in sorted(_OPTIMIZERS):
            _fsdp_case(rank, name, backend, 0.05 if name == "AdamW" else None, False, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fsdp2_single_rank_nccl_on_the_gpu(backend):
    """#17 on a GPU machine: FSDP2 with nccl on the one GPU (a single rank), the CUDA DTensor
    shards through the GPU kernels (asserted), against torch.optim; the multi-rank tests above
    run on the CPU there too."""
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs a CUDA GPU and nccl")
    reason = fastopt.backends.why_unavailable(backend, "cuda")
    if reason:
        pytest.skip(reason)
    _spawn(_nccl_single_rank, backend, world=1)
