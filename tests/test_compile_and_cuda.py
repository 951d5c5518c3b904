"""torch.compile of a step, and the GPU-only contracts: no host sync, CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

from harness import Side, assert_same_params, lockstep
from specs import NAMES, SPEC_BY_NAME, TOL, clone_params, make_params, random_grads

HAS_CUDA = torch.cuda.is_available()


def _clipped_pair(backend, device, n_params=None, name="Adam"):
    params = make_params(torch.float32, device)
    ours, theirs = clone_params(params), clone_params(params)
    spec = SPEC_BY_NAME[name]
    opt_f = spec.fastopt_cls(ours, lr=0.01, max_grad_norm=1.0, backend=backend, **spec.stateful)
    opt_t = spec.torch_cls(theirs, lr=0.01, foreach=False, **spec.stateful)
    return params, ours, theirs, opt_f, opt_t


def _torch_clipped_step(opt_t, theirs):
    torch.nn.utils.clip_grad_norm_([p for p in theirs if p.numel()], 1.0)
    opt_t.step()


# What runs the math of a compiled step: the list ops of the compiled backends, the reference
# rules for the others (Dynamo cannot trace the host side of a plan; Note [the plan life cycle]).
COMPILED_PATH = {"cpu": "kernel", "cuda": "kernel", "triton": "reference", "reference": "reference"}


def test_torch_compile_of_a_clipped_step(backend, device):
    """Fails on torch 2.11 when step() sets attributes of the optimizer (Note [step state
    outside the optimizer]); last_grad_norm must be there as in eager mode."""
    params, ours, theirs, opt_f, opt_t = _clipped_pair(backend, device)
    norms = []

    def torch_step():
        norms.append(torch.nn.utils.clip_grad_norm_([p for p in theirs if p.numel()], 1.0))
        opt_t.step()

    def check(step):
        assert opt_f.last_grad_norm is not None, "a compiled clipped step left last_grad_norm unset"
        torch.testing.assert_close(opt_f.last_grad_norm.cpu(), norms[-1].cpu(), rtol=1e-6, atol=0)
        stats = opt_f.step_stats
        assert getattr(stats, COMPILED_PATH[backend]) == len(params), stats

    lockstep([Side(opt_f, ours, step=torch.compile(opt_f.step)), Side(opt_t, theirs, step=torch_step)], params,
             steps=3, after_step=check)
    assert_same_params(ours, theirs, **TOL[torch.float32])


@pytest.mark.parametrize("name", [n for n in NAMES if n != "Adam"])  # (AdamW is Adam's code)
def test_torch_compile_with_an_lr_scheduler_compiles_once_per_lr_kind(name, backend, device):
    """A float lr changed by a scheduler every step: Dynamo recompiles once (the lr becomes a
    graph input, as for torch.optim), not at every new value until the recompile limit
    (Note [no recompiles for new hyperparameter values])."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    params = make_params(torch.float32, device)
    ours, theirs = clone_params(params), clone_params(params)
    spec = SPEC_BY_NAME[name]
    opt_f = spec.fastopt_cls(ours, lr=0.01, backend=backend, **spec.stateful)
    opt_t = spec.torch_cls(theirs, lr=0.01, foreach=False, **spec.stateful)
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9) for o in (opt_f, opt_t)]
    graphs = []

    def after(step):
        for s in scheds:
            s.step()
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])

    lockstep([Side(opt_f, ours, step=torch.compile(opt_f.step)), Side(opt_t, theirs)], params, steps=7,
             after_step=after)
    assert graphs[2:] == [graphs[2]] * len(graphs[2:]), f"graphs compiled after each step: {graphs}"
    assert_same_params(ours, theirs, **TOL[torch.float32])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", NAMES)
def test_step_never_syncs_with_the_host(name, backend, device):
    if device != "cuda":
        pytest.skip("the sync check is a CUDA check")
    params = make_params(torch.float32, device)
    opt = SPEC_BY_NAME[name].fastopt_cls(params, max_grad_norm=1.0, backend=backend, **SPEC_BY_NAME[name].stateful)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step builds state and the plan
    scaler_scale = torch.full((), 4.0, device=device)
    opt.grad_scale, opt.found_inf = scaler_scale, torch.zeros((), device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_graph_capture_and_replay_of_a_clipped_step(name, backend, device):
    if device != "cuda":
        pytest.skip("CUDA graphs need CUDA tensors")
    params, ours, theirs, opt_f, opt_t = _clipped_pair(backend, device, name=name)
    torch_side = Side(opt_t, theirs, step=lambda: _torch_clipped_step(opt_t, theirs))
    lockstep([Side(opt_f, ours), torch_side], params, steps=1)  # state exists after this step
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_f.step()

    def copy_in(params, grads):
        for p, g in zip(params, grads):
            p.grad.copy_(g)  # graphs replay on the captured gradient buffers

    lockstep([Side(opt_f, ours, give=copy_in, step=graph.replay), torch_side], params, steps=3)
    torch.cuda.synchronize()
    assert_same_params(ours, theirs, **TOL[torch.float32])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_cuda_graph_of_a_clipped_amp_step(backend, device):
    """A captured step with GradScaler's grad_scale and found_inf (as GradScaler.step sets them):
    replays unscale, clip and update with the values in device memory at replay time, and a
    replay with found_inf set changes nothing."""
    if device != "cuda":
        pytest.skip("CUDA graphs need CUDA tensors")
    params, ours, theirs, opt_f, opt_t = _clipped_pair(backend, device)
    scale = torch.full((), 8.0, device=device)
    found_inf = torch.zeros((), device=device)
    opt_f.grad_scale, opt_f.found_inf = scale, found_inf

    def feed(params, grads):
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g * scale
            else:
                p.grad.copy_(g * scale)  # graphs replay on the captured gradient buffers

    torch_side = Side(opt_t, theirs, step=lambda: _torch_clipped_step(opt_t, theirs))
    lockstep([Side(opt_f, ours, give=feed), torch_side], params, steps=1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_f.step()
    lockstep([Side(opt_f, ours, give=feed, step=graph.replay), torch_side], params, steps=3)
    torch.cuda.synchronize()
    assert_same_params(ours, theirs, **TOL[torch.float32])
    before = [p.detach().clone() for p in ours]
    found_inf.fill_(1.0)
    feed(ours, random_grads(params))
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(ours, before))
