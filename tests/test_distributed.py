"""fastopt under torch.distributed on this machine's CPU: the gloo backend, 2 processes.

FSDP2 (``fully_shard``) makes every param a DTensor holding this rank's shard. Such a tensor has
no memory of its own for a kernel to walk; before this test existed, the first step of any
fastopt optimizer handed it to the compiled code and the process died with a segfault. Each
case runs fastopt and torch.optim side by side in the same processes and compares them.
"""

from __future__ import annotations

import copy
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastopt

WORLD = 2
# fp32, same rules, same order of operations: fastopt's reference rules against torch.optim's
# single-tensor path on the same DTensors; what differs is foreach against per-tensor kernels,
# i.e. fp32 rounding of equal formulas (a few ulps after a handful of steps).
RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` in WORLD fresh processes; a failure in any rank fails the test
    with that rank's traceback."""
    mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 16 rows shard evenly over 2 ranks; 5 rows (and the 5-element bias) do not: rank 1 holds a
    # padded, uneven shard
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


_OPTIMIZERS = {
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "Adam": dict(lr=1e-2, amsgrad=True),
    "Adagrad": dict(lr=0.1),
    "RMSprop": dict(lr=1e-2, momentum=0.9, centered=True),
}


def _fsdp_parity(rank: int, port: int, cases: list, backend: str) -> None:
    _init(rank, port)
    try:
        for name, max_norm in cases:
            _fsdp_case(rank, name, backend, max_norm)
    finally:
        dist.destroy_process_group()


def _fsdp_case(rank: int, name: str, backend: str, max_norm) -> None:
    base = _model()
    ours_m, theirs_m = _shard(copy.deepcopy(base)), _shard(copy.deepcopy(base))
    kwargs = _OPTIMIZERS[name]
    extras = {} if max_norm is None else {"max_grad_norm": max_norm}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = getattr(fastopt, name)(ours_m.parameters(), backend=backend, **kwargs, **extras)
        theirs = getattr(torch.optim, name)(theirs_m.parameters(), foreach=False, **kwargs)
        torch.manual_seed(100 + rank)  # each rank its own data, as in training
        for step in range(4):
            x = torch.randn(6, 8)
            for m in (ours_m, theirs_m):
                m(x).square().mean().backward()
            if max_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(theirs_m.parameters(), max_norm)
            theirs.step()
            ours.step()
            stats = ours.step_stats
            assert stats.reference == 4 and stats.kernel == 0, stats  # DTensors: the reference rules
            if max_norm is not None:
                got = ours.last_grad_norm
                got = got.full_tensor() if hasattr(got, "full_tensor") else got
                want = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
            for opt in (ours, theirs):
                opt.zero_grad()
    if backend != "reference":
        assert any("DTensor params take the reference path" in str(w.message) for w in caught), \
            [str(w.message) for w in caught]
    for (n, p), q in zip(ours_m.named_parameters(), theirs_m.parameters()):
        assert type(p).__name__ == "DTensor"
        torch.testing.assert_close(p.to_local(), q.to_local(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{n}: {m}")
        for key, value in theirs.state[q].items():
            mine = ours.state[p][key]
            if key == "step":
                assert float(mine) == float(value)
            else:
                torch.testing.assert_close(mine.to_local(), value.to_local(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_fsdp2_dtensor_params_step_like_torch(backend):
    """#14 item 7: DTensor params never reach the compiled code (the first step segfaulted);
    every optimizer steps them like torch.optim, on the reference rules, with a warning and the
    count in step_stats; max_grad_norm over DTensor grads is the norm over every rank's shard, as
    clip_grad_norm_ computes it. (One spawn per backend: starting a process group costs seconds.)"""
    reason = fastopt.backends.why_unavailable(backend, "cpu")
    if reason:
        pytest.skip(reason)
    _spawn(_fsdp_parity, [(name, None) for name in sorted(_OPTIMIZERS)] + [("AdamW", 0.05)], backend)


def _entry_points_refuse_dtensors(rank: int, port: int) -> None:
    _init(rank, port)
    try:
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
                C.cpu_adam_plan(p, g, m, v, [], steps, [], owners)
        # the registered ops (bn_relu calls one): DTensor's own dispatch refuses an op it has no
        # rule for, before our kernels see it
        with pytest.raises(NotImplementedError, match="sharding strategy"):
            C.bn_relu(d[0], None, None, None, None, True, 0.1, 1e-5)
        with pytest.raises(NotImplementedError, match="sharding strategy"):
            torch.ops.fastopt.multi_tensor_norm(d, 2.0, None, None)
    finally:
        dist.destroy_process_group()


def test_the_compiled_entry_points_refuse_dtensors():
    """Users can call the plans and ops directly: a DTensor there is a clear error, not a read
    through a pointer that is not its elements."""
    if not fastopt._ext.has_cpu_ops():
        pytest.skip("the extension is not built")
    _spawn(_entry_points_refuse_dtensors)


def _ddp_parity(rank: int, port: int, backend: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, port)
    try:
        for name in sorted(_OPTIMIZERS):
            for options in (dict(gradient_as_bucket_view=True), dict(gradient_as_bucket_view=True, static_graph=True),
                            dict()):
                base = _model()
                ours_m, theirs_m = DDP(copy.deepcopy(base), **options), DDP(copy.deepcopy(base), **options)
                ours = getattr(fastopt, name)(ours_m.parameters(), backend=backend, max_grad_norm=0.5,
                                              **_OPTIMIZERS[name])
                theirs = getattr(torch.optim, name)(theirs_m.parameters(), foreach=False, **_OPTIMIZERS[name])
                torch.manual_seed(100 + rank)
                for step in range(4):
                    x = torch.randn(6, 8)
                    for m in (ours_m, theirs_m):
                        m(x).square().mean().backward()
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
                    torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} {options}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_ddp_steps_like_torch_on_the_kernels(backend):
    """#17: DDP-wrapped models, grads as views into DDP's buckets (gradient_as_bucket_view, with and
    without static_graph) or not: every optimizer with clipping on the backend's kernels (asserted)
    ends where torch.optim with clip_grad_norm_ ends."""
    reason = fastopt.backends.why_unavailable(backend, "cpu")
    if reason:
        pytest.skip(reason)
    _spawn(_ddp_parity, backend)
