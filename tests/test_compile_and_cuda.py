"""torch.compile of a step, and the GPU-only contracts: no host sync, CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

from harness import assert_same_params, set_grads
from specs import SPEC_BY_NAME, TOL, clone_params, make_params, random_grads

HAS_CUDA = torch.cuda.is_available()


def _clipped_pair(backend, device, n_params=None):
    params = make_params(torch.float32, device)
    ours, theirs = clone_params(params), clone_params(params)
    opt_f = SPEC_BY_NAME["Adam"].fastopt_cls(ours, lr=0.01, max_grad_norm=1.0, backend=backend)
    opt_t = torch.optim.Adam(theirs, lr=0.01, foreach=False)
    return params, ours, theirs, opt_f, opt_t


def _torch_clipped_step(opt_t, theirs):
    torch.nn.utils.clip_grad_norm_([p for p in theirs if p.numel()], 1.0)
    opt_t.step()


def test_torch_compile_of_a_clipped_step(backend, device):
    params, ours, theirs, opt_f, opt_t = _clipped_pair(backend, device)
    step = torch.compile(opt_f.step)
    for _ in range(3):
        grads = random_grads(params)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        step()
        _torch_clipped_step(opt_t, theirs)
    assert_same_params(ours, theirs, **TOL[torch.float32])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", ["Adam", "Adagrad", "RMSprop"])
def test_step_never_syncs_with_the_host(name, backend, device):
    if device != "cuda":
        pytest.skip("the sync check is a CUDA check")
    params = make_params(torch.float32, device)
    opt = SPEC_BY_NAME[name].fastopt_cls(params, max_grad_norm=1.0, backend=backend)
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
def test_cuda_graph_capture_and_replay_of_a_clipped_step(backend, device):
    if device != "cuda":
        pytest.skip("CUDA graphs need CUDA tensors")
    params, ours, theirs, opt_f, opt_t = _clipped_pair(backend, device)
    grads = random_grads(params)
    set_grads(ours, grads)
    set_grads(theirs, grads)
    opt_f.step()  # warm-up on a side stream is not needed: state exists after this step
    _torch_clipped_step(opt_t, theirs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_f.step()
    for _ in range(3):
        grads = random_grads(params)
        for p, g in zip(ours, grads):
            p.grad.copy_(g)  # graphs replay on the captured gradient buffers
        set_grads(theirs, grads)
        graph.replay()
        _torch_clipped_step(opt_t, theirs)
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

    def feed(grads):
        for p, g in zip(ours, grads):
            if p.grad is None:
                p.grad = g * scale
            else:
                p.grad.copy_(g * scale)  # graphs replay on the captured gradient buffers
        set_grads(theirs, grads)

    feed(random_grads(params))
    opt_f.step()
    _torch_clipped_step(opt_t, theirs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_f.step()
    for _ in range(3):
        feed(random_grads(params))
        graph.replay()
        _torch_clipped_step(opt_t, theirs)
    torch.cuda.synchronize()
    assert_same_params(ours, theirs, **TOL[torch.float32])
    before = [p.detach().clone() for p in ours]
    found_inf.fill_(1.0)
    feed(random_grads(params))
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(ours, before))
