"""Note [the plan life cycle] (fastopt/_plan.py) as a state machine: build, bind, stale, fall back.

Each test drives an optimizer through user actions and checks, after every step, whether the plan
was rebuilt or reused, how many params went through the kernels, the fallback or were skipped
(``step_stats``), and at the end that every param and state tensor is torch.optim's.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastopt
from conftest import isolated
from harness import Side, assert_matches, assert_ran_on, lockstep, set_grads
from specs import NAMES, SPEC_BY_NAME, clone_params

PLANNED = ("cpu", "triton", "cuda")


def _params(device):
    """Two groups' worth: a permuted (non-contiguous, dense) param among ordinary ones."""
    return [
        torch.nn.Parameter(torch.randn(4, 5, device=device)),
        torch.nn.Parameter(torch.randn(5, 4, device=device).t()),  # strides (1, 4)
        torch.nn.Parameter(torch.randn(3, device=device)),
        torch.nn.Parameter(torch.randn(0, device=device)),
        torch.nn.Parameter(torch.randn(6, 2, device=device)),
    ]


def _groups(params, lr):
    return [{"params": params[:3]}, {"params": params[3:], "lr": lr * 3}]


class Pair:
    """fastopt and torch.optim on the same params, stepped with the same grads."""

    def __init__(self, name, backend, device, **config):
        spec = SPEC_BY_NAME[name]
        base = _params(device)
        self.ours, self.theirs = clone_params(base), clone_params(base)
        self.opt_f = spec.fastopt_cls(_groups(self.ours, spec.lr), backend=backend, lr=spec.lr, **config)
        self.opt_t = spec.torch_cls(_groups(self.theirs, spec.lr), foreach=False, lr=spec.lr, **config)
        self.backend = backend

    def grads(self, contiguous=(), absent=()):
        """Fresh grads as autograd lays them out (like the param), or contiguous for the indices
        in ``contiguous`` (what ``p.grad = tensor`` gives), or none for ``absent``."""
        out = []
        for i, p in enumerate(self.ours):
            if i in absent:
                out.append(None)
            elif i in contiguous:
                out.append(torch.randn(p.shape, device=p.device))
            else:
                out.append(torch.randn_like(p))
        return out

    def step(self, grads):
        """One lockstep step with ``grads``; the plan the step ran and its stats."""
        lockstep([Side(self.opt_f, self.ours), Side(self.opt_t, self.theirs)], steps=1, grads=lambda step: grads)
        return self.opt_f._run.plan, self.opt_f.step_stats

    def check(self):
        assert_matches(self.opt_f, self.opt_t, self.ours, self.theirs, torch.float32)


def _on_kernels(backend, stats, n):
    """All ``n`` params of the step went where this backend sends them: its kernels (planned
    backends) or the reference rules (backend='reference')."""
    if backend in PLANNED:
        assert (stats.kernel, stats.reference) == (n, 0), stats
    else:
        assert (stats.kernel, stats.reference) == (0, n), stats


@pytest.mark.parametrize("name", NAMES)
def test_two_groups_with_a_contiguous_grad_for_a_permuted_param(name, backend, device):
    """The first GPU run's failure: every step raised on cpu, cuda and triton. Now the grad is
    relaid into the param's layout, the kernels update every param and the plan is built once."""
    pair = Pair(name, backend, device, **SPEC_BY_NAME[name].stateful)
    plans = []
    for _ in range(5):
        plan, stats = pair.step(pair.grads(contiguous={1}))
        plans.append(plan)
        _on_kernels(backend, stats, 5)
        if backend in PLANNED:
            assert stats.relaid == 1, stats
    assert all(p is plans[0] for p in plans), "the plan was rebuilt"
    pair.check()


def test_the_plan_as_a_state_machine(backend, device):
    """build -> bind (same plan) -> relaid grad (same plan) -> absent grads (same plan, skipped)
    -> new storage (stale: a compiled plan is rebuilt once) -> bind again (same plan)."""
    _state_machine(backend, device)


@pytest.mark.parametrize("binder", ["C++", "Python"])
def test_the_triton_plan_binds_alike_in_cpp_and_python(binder, backend, device, monkeypatch):
    """Note [the Triton plan binds in C++] (csrc/bindings/grad_binder.cpp): the extension's binder, and the Python
    loop that binds when the extension is not there, through the same state machine."""
    if backend != "triton":
        pytest.skip("the Triton plan's binding")
    if binder == "Python":
        monkeypatch.setattr(fastopt._ext, "has_cpu_ops", lambda: False)
    elif not fastopt._ext.has_cpu_ops():
        pytest.skip("fastopt._C is not built")
    pair = _state_machine(backend, device)
    plans = [sp.plan for b in pair.opt_f._run.plan.buckets for sp in b.run.plans]
    assert len(plans) == 2 and all((plan._binder is None) == (binder == "Python") for plan in plans)


def _state_machine(backend, device):
    pair = Pair("Adam", backend, device, weight_decay=0.1)
    plan0, stats = pair.step(pair.grads())  # build
    _on_kernels(backend, stats, 5)

    plan, stats = pair.step(pair.grads())  # bind
    assert plan is plan0
    _on_kernels(backend, stats, 5)

    plan, stats = pair.step(pair.grads(contiguous={1, 4}))  # relaid (index 4 is contiguous already)
    assert plan is plan0
    _on_kernels(backend, stats, 5)
    assert stats.relaid == (1 if backend in PLANNED else 0)

    steps_before = [float(pair.opt_f.state[p]["step"]) for p in pair.ours]
    values_before = [p.detach().clone() for p in pair.ours]
    plan, stats = pair.step(pair.grads(absent={0, 3}))  # params without grads are skipped
    assert plan is plan0
    _on_kernels(backend, stats, 3)
    if backend in PLANNED:
        assert stats.skipped == 2
    for i in (0, 3):
        assert float(pair.opt_f.state[pair.ours[i]]["step"]) == steps_before[i]
        assert torch.equal(pair.ours[i].detach(), values_before[i])

    for params in (pair.ours, pair.theirs):  # new storage: the plan must not write the old one
        params[2].data = params[2].data.clone()
    plan1, stats = pair.step(pair.grads())
    # every backend re-plans (the reference too: its segments hold what the build saw, such as a
    # complex param's real view of the old storage; test_a_replaced_complex_param_is_updated_...)
    assert plan1 is not plan0
    _on_kernels(backend, stats, 5)

    plan, stats = pair.step(pair.grads())
    assert plan is plan1
    pair.check()
    return pair


def test_a_param_the_kernels_cannot_take_falls_back_alone(backend, device):
    """A param whose state is laid out unlike it (loaded from a checkpoint of a contiguous copy)
    takes the fallback path every step; the other params stay on the kernels, and the plan is
    not rebuilt."""
    pair = Pair("Adam", backend, device)
    pair.step(pair.grads())
    sd = pair.opt_f.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):  # param 1 is permuted; its state becomes contiguous
        sd["state"][1][key] = sd["state"][1][key].contiguous()
    pair.opt_f.load_state_dict(sd)
    assert pair.opt_f.state[pair.ours[1]]["exp_avg"].is_contiguous()  # unlike the param
    plans = []
    for _ in range(4):
        plan, stats = pair.step(pair.grads())
        plans.append(plan)
        if backend == "cpu":  # its fallback is the list op: the same C++ kernels on copies
            assert (stats.kernel, stats.reference) == (5, 0), stats
        elif backend in PLANNED:
            assert (stats.kernel, stats.reference) == (4, 1), stats
        else:
            assert (stats.kernel, stats.reference) == (0, 5), stats
    assert all(p is plans[0] for p in plans)
    pair.check()


@pytest.mark.parametrize("bad", ["dtype", "shape_via_view"])
@isolated
def test_a_grad_the_kernels_must_not_read_raises_and_changes_nothing(bad, backend, device):
    """A grad of another dtype is refused before anything is written (torch.optim raises too)."""
    pair = Pair("Adam", backend, device)
    pair.step(pair.grads())
    before = {id(p): (p.detach().clone(), {k: v.clone() for k, v in pair.opt_f.state[p].items()})
              for p in pair.ours}
    grads = pair.grads()
    for p, g in zip(pair.ours, grads):
        p.grad = g
    # torch refuses such grads at assignment (or needs grad_dtype=None); .data gets them past it
    if bad == "dtype":
        pair.ours[2].grad.data = pair.ours[2].grad.double()
        match = "dtype"
    else:  # the same element count, another shape
        pair.ours[4].grad.data = torch.randn(3, 4, device=device)
        match = "shape"
    with pytest.raises(RuntimeError, match=match):
        pair.opt_f.step()
    for p in pair.ours:
        value, state = before[id(p)]
        assert torch.equal(p.detach(), value)
        for k, v in state.items():
            assert torch.equal(pair.opt_f.state[p][k], v), k


def test_grads_appear_vanish_and_return_without_a_rebuild_per_step(backend, device):
    """A param that alternates between having and not having a grad (a branch used every other
    step) costs no rebuild once it has been planned."""
    pair = Pair("RMSprop", backend, device, momentum=0.5, centered=True)
    plans = []
    for step in range(8):
        plan, stats = pair.step(pair.grads(absent={2} if step % 2 else ()))
        plans.append(plan)
    assert all(p is plans[0] for p in plans)
    pair.check()


def test_sgd_buffers_start_from_each_params_first_grad(backend, device):
    """Note [SGD's first step]: a momentum buffer becomes the grad on its own first step (with
    dampening, a buffer started from zeros would differ), whether the param has a grad from the
    start or gets its first one steps later (a new plan), and a buffer loaded from a torch.optim
    state dict is not started again; grads that vanish and return keep the buffer going."""
    pair = Pair("SGD", backend, device, momentum=0.9, dampening=0.5)
    for step in range(4):
        pair.step(pair.grads(absent={2, 4} if step < 2 else ({4} if step == 3 else ())))
        pair.check()
    assert "momentum_buffer" in pair.opt_f.state[pair.ours[2]]
    pair.opt_f.load_state_dict(copy.deepcopy(pair.opt_t.state_dict()))
    for step in range(3):
        pair.step(pair.grads(absent={0} if step == 1 else ()))
        pair.check()


def test_sgd_momentum_switched_on_mid_run_starts_its_buffers(backend, device):
    """A group's momentum set from 0 to 0.9 after two steps (and after a torch.optim state dict
    without any state was loaded): the plan is rebuilt with buffers, which start from that step's
    grads, as torch's do."""
    pair = Pair("SGD", backend, device, dampening=0.5)
    for _ in range(2):
        pair.step(pair.grads())
    pair.opt_f.load_state_dict(copy.deepcopy(pair.opt_t.state_dict()))
    assert pair.opt_f.state_dict()["state"] == {}
    for opt in (pair.opt_f, pair.opt_t):
        for group in opt.param_groups:
            group["momentum"] = 0.9
    for _ in range(3):
        pair.step(pair.grads())
        pair.check()


@pytest.mark.parametrize("config", [{}, {"max_grad_norm": 1.0}], ids=["plain", "clipped"])
def test_no_grad_outlives_its_step(config, backend, device):
    """Note [grads held only for the step]: after a step, zero_grad() (set_to_none=True) frees
    every grad, as with torch.optim. A plan that kept the last step's grads would keep a model's
    whole gradient memory alive through the next forward and backward, and free the old grads
    (their Python objects too) inside the next step's binding. Grads as autograd makes them, one
    assigned by hand in another layout (relaid for the step), one param without a grad, two
    param groups, clipping on and off."""
    import gc
    import weakref

    params = _params(device)
    opt = fastopt.AdamW(_groups(params, 1e-3), backend=backend, **config)
    x = torch.randn(5, device=device)
    for step in range(3):
        sum((p * x[: p.shape[-1]]).sum() for p in params).backward()
        params[1].grad = torch.randn(params[1].shape, device=device)  # contiguous: relaid
        if step:
            params[2].grad = None  # no grad this step (planned at step 0)
        grads = [weakref.ref(p.grad) for p in params if p.grad is not None]
        opt.step()
        if backend in PLANNED:
            counts = (opt.step_stats.kernel, opt.step_stats.relaid, opt.step_stats.skipped)
            assert counts == (len(grads), 1, 1 if step else 0), opt.step_stats
        opt.zero_grad()
        gc.collect()
        assert [g() for g in grads] == [None] * len(grads), f"step {step}: a grad outlived its step"


def _views_of_one_buffer(grads, device):
    """The grads as views of one flat buffer, each laid out like the given one, one element apart
    (a flat model's grads, DDP's gradient_as_bucket_view); None stays None."""
    flat = torch.zeros(sum(g.numel() + 1 for g in grads if g is not None), device=device)
    views, offset = [], 0
    for g in grads:
        if g is None:
            views.append(None)
            continue
        views.append(flat.as_strided(g.shape, g.stride(), offset).copy_(g))
        offset += g.numel() + 1
    return flat, views


def test_grads_as_views_of_one_buffer(backend, device):
    """Note [one hold per grad storage] (csrc/include/fastopt/grad_binding.h): grads that are views
    of one buffer are held through the step by one reference. Among them a view laid out unlike
    its permuted param (relaid, steps 1 and 3), a param without a grad (step 2), a grad with storage
    of its own between the views (step 3), and an empty param's: the kernels update every param
    like torch.optim, the plan is built once, and neither a grad nor its buffer outlives the step
    once zero_grad() has dropped them."""
    import gc
    import weakref

    from torch.multiprocessing.reductions import StorageWeakRef

    pair = Pair("Adam", backend, device, weight_decay=0.1)
    plans = []
    for step in range(4):
        grads = pair.grads(contiguous={1} if step % 2 else (), absent={4} if step == 2 else ())
        flat, views = _views_of_one_buffer(grads, device)
        if step == 3:
            views[2] = grads[2].clone()
        set_grads(pair.theirs, grads)
        for p, v in zip(pair.ours, views):
            p.grad = v
        del v
        pair.opt_f.step()
        pair.opt_t.step()
        stats = pair.opt_f.step_stats
        _on_kernels(backend, stats, sum(g is not None for g in grads))
        if backend in PLANNED:
            assert (stats.relaid, stats.skipped) == (step % 2, int(step == 2)), stats
        plans.append(pair.opt_f._run.plan)
        refs = [weakref.ref(v) for v in views if v is not None]
        storage = StorageWeakRef(flat.untyped_storage())
        pair.opt_f.zero_grad()
        pair.opt_t.zero_grad()
        del flat, views, grads
        gc.collect()
        assert [r() for r in refs] == [None] * len(refs) and storage.expired(), f"step {step}: a grad outlived its step"
    assert all(p is plans[0] for p in plans), "the plan was rebuilt"
    pair.check()


def _steps_after_new_memory(pair, plan0, backend):
    """Two more steps: the first rebuilds the plan and runs every param on the kernels; the
    results are torch.optim's."""
    plan, stats = pair.step(pair.grads())
    _on_kernels(backend, stats, 5)
    if backend in PLANNED:
        assert plan is not plan0, "the plan was not rebuilt"
    pair.step(pair.grads())
    pair.check()


@pytest.mark.parametrize("how", ["share_memory_", "storage resized"])
@isolated
def test_a_param_given_new_memory_is_replanned(how, backend, device):
    """A param whose storage gets new memory after the plan was built (``model.share_memory()``
    for Hogwild after a first step; a storage resized away and back, as FSDP1 frees params): the
    same storage at another address. The plan once kept writing to the freed memory (the step
    lost, the heap corrupted); now it is stale and rebuilt, and the steps are torch.optim's."""
    if how == "share_memory_" and device != "cpu":
        pytest.skip("share_memory_ moves CPU tensors only")
    pair = Pair("Adam", backend, device, weight_decay=0.1)
    plan0, _ = pair.step(pair.grads())
    for p in pair.ours[:3]:
        if how == "share_memory_":
            p.share_memory_()
        else:
            kept = p.detach().clone()
            storage = p.untyped_storage()
            nbytes = storage.nbytes()
            storage.resize_(0)
            storage.resize_(nbytes)
            p.detach().copy_(kept)
    _steps_after_new_memory(pair, plan0, backend)


@pytest.mark.parametrize("placed", [True, False], ids=["in the state buffer", "alone"])
@pytest.mark.parametrize("how", ["share_memory_", ".data ="])
@isolated
def test_a_state_tensor_given_new_memory_is_replanned(how, placed, backend, device, monkeypatch):
    """Note [state moved in place] (csrc/include/fastopt/state_buffer.h): state tensors given new
    memory after the plan was built (``share_memory_()`` for Hogwild, ``.data = ``), whether they
    lie in the state buffer or were allocated alone (over its size limit: here every tensor). The
    plan kept writing to the old memory, the steps were lost; now it is rebuilt, and the steps are
    torch.optim's."""
    if how == "share_memory_" and device != "cpu":
        pytest.skip("share_memory_ moves CPU tensors only")
    if not placed:
        monkeypatch.setattr(fastopt.optim._state_buffer, "MAX_PIECE_BYTES", -1)
    pair = Pair("Adam", backend, device, weight_decay=0.1)
    plan0, _ = pair.step(pair.grads())
    for p in pair.ours[:2]:
        for key in ("exp_avg", "step"):
            t = pair.opt_f.state[p][key]
            if how == "share_memory_":
                t.share_memory_()
            else:
                t.data = t.clone()
    _steps_after_new_memory(pair, plan0, backend)


def test_step_stats_of_a_fresh_optimizer_are_zero():
    opt = fastopt.Adam([torch.nn.Parameter(torch.randn(3))], backend="reference")
    assert (opt.step_stats.kernel, opt.step_stats.reference, opt.step_stats.skipped) == (0, 0, 0)


@pytest.mark.parametrize("how", ["whole model", "one layer"])
@isolated
def test_a_param_dtype_changed_after_the_first_step_is_refused(how, backend, device):
    """model.bfloat16() after opt.step(): torch.optim raises (its float32 state meets bfloat16
    grads); fastopt once kept stepping with the old element size (NaNs, a corrupted heap). Now the
    plan goes stale, the state is found not to fit, and the step raises with nothing written."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(device)
    opt = fastopt.Adam(model.parameters(), backend=backend)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    (model if how == "whole model" else model[1]).bfloat16()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    steps = [float(s["step"]) for s in opt.state.values()]
    with pytest.raises(RuntimeError, match="state|dtype"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert [float(s["step"]) for s in opt.state.values()] == steps


@pytest.mark.parametrize("name", NAMES)
def test_after_a_deliberate_dtype_change_reloading_the_state_dict_continues(name, backend, device):
    """The way out the refusal above names (README, differences on purpose): reloading the
    optimizer's own state dict casts its state to the params' new dtypes, as torch's loading does;
    the next steps then equal torch.optim's after the same reload."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(device)
    twin = copy.deepcopy(model)
    kw = SPEC_BY_NAME[name].stateful
    ours = getattr(fastopt, name)(model.parameters(), lr=0.01, backend=backend, **kw)
    theirs = getattr(torch.optim, name)(twin.parameters(), lr=0.01, foreach=False, **kw)

    def two_steps():
        for _ in range(2):
            for p, q in zip(model.parameters(), twin.parameters()):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            ours.step()
            theirs.step()

    two_steps()
    model.double()
    twin.double()
    ours.load_state_dict(ours.state_dict())
    theirs.load_state_dict(theirs.state_dict())
    two_steps()
    assert_ran_on(ours, backend)  # the float64 params on the backend's kernels, not a fallback
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == torch.float64
        # two float32 steps first: float32's tolerance
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_replaced_complex_param_is_updated_where_it_now_lives(backend, device):
    """``p.data = ...`` between steps on a complex param: the step updates the new values, as
    torch.optim does. (The reference backend stepped the real view it had taken of the old storage
    at the plan's build: the param did not move, silently.) Against torch.optim's Adam."""
    ours = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64, device=device))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = fastopt.Adam([ours], lr=0.1, backend=backend)
    ref = torch.optim.Adam([theirs], lr=0.1, foreach=False)
    for step in range(2):
        for p, o in ((ours, opt), (theirs, ref)):
            if step == 1:
                p.data = torch.full((3,), 2.0, dtype=torch.complex64, device=device)
            p.grad = torch.ones_like(p)
            o.step()
    torch.testing.assert_close(ours.detach(), theirs.detach())
    assert float(ours.detach().real.max()) < 2.0  # it moved


@pytest.mark.parametrize("name", NAMES)
def test_a_param_turned_bfloat16_gets_its_compensation_at_that_step(name, backend, device):
    """compensation="kahan" with state_dtype=bf16 (the moments fit any param dtype): a float32
    param turned bf16 between steps is stored with a compensation buffer from that very step, on
    every backend alike. (The reference backend kept stepping it in its float32 bucket, without a
    buffer, until something else rebuilt its plan: the rounding rest of that step was lost and the
    backends disagreed.)"""
    results = []
    for b in ("reference", backend):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, device=device))
        opt = getattr(fastopt, name)([p], lr=1e-2, backend=b, compensation="kahan", state_dtype=torch.bfloat16)
        p.grad = torch.randn_like(p)
        opt.step()
        assert "compensation" not in opt.state[p]
        p.data = p.data.to(torch.bfloat16)
        p.grad = torch.randn(64, device=device).to(torch.bfloat16)
        opt.step()
        assert "compensation" in opt.state[p] and opt.state[p]["compensation"].abs().max() > 0, b
        results.append((p.detach().clone(), opt.state[p]["compensation"].clone()))
    (p_ref, c_ref), (p_now, c_now) = results
    # the same rounding rest: params within one bf16 ulp (2^-7 relative at most) and the values
    # they stand for (param + compensation) to float32 rounding of values up to ~4 (the kernels'
    # float32 results may differ from the reference's ops by an ulp: tests/test_state_dtype.py)
    torch.testing.assert_close(p_now.float(), p_ref.float(), rtol=2**-7, atol=0)
    torch.testing.assert_close(p_now.float() + c_now.float(), p_ref.float() + c_ref.float(), rtol=0, atol=1e-5)
