"""The plan cache (Note [the plan cache]): whatever changes between steps, the cached plan either
follows or is rebuilt, and the result stays torch.optim's."""

from __future__ import annotations

import pytest
import torch

import fastopt
from conftest import isolated, skip_unsupported
from harness import Side, assert_matches, assert_ran_on, lockstep, set_grads
from specs import NAMES, SPEC_BY_NAME, clone_params, make_params, random_grads


def _pair(name, backend, device, **config):
    spec = SPEC_BY_NAME[name]
    params = make_params(torch.float32, device)
    ours, theirs = clone_params(params), clone_params(params)
    opt_f = spec.fastopt_cls(ours, backend=backend, **config)
    opt_t = spec.torch_cls(theirs, foreach=False, **config)
    return params, ours, theirs, opt_f, opt_t


def _step_both(params, ours, theirs, opt_f, opt_t, grads=None):
    grads = grads if grads is not None else random_grads(params)
    set_grads(ours, grads)
    set_grads(theirs, grads)
    opt_f.step()
    opt_t.step()


@pytest.mark.parametrize("name", [n for n in NAMES if n != "AdamW"])
def test_param_storage_replaced_between_steps(name, backend, device):
    """``p.data = ...`` gives a param new storage: the plan must not keep writing the old one."""
    params, ours, theirs, opt_f, opt_t = _pair(name, backend, device, **SPEC_BY_NAME[name].stateful)
    for step in range(6):
        if step == 3:
            for p in (ours[2], theirs[2], ours[5], theirs[5]):
                p.data = p.data.clone()
        _step_both(params, ours, theirs, opt_f, opt_t)
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "SGD"])
def test_grads_laid_out_unlike_their_params(name, backend, device):
    """A grad whose strides differ from its param's (a transposed grad of a contiguous param)
    takes the copy path on some steps and the planned path on others."""
    spec = SPEC_BY_NAME[name]
    shapes = [(4, 6), (5, 3), (7,)]
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    ours, theirs = clone_params(params), clone_params(params)
    opt_f = spec.fastopt_cls(ours, backend=backend, **spec.stateful)
    opt_t = spec.torch_cls(theirs, foreach=False, **spec.stateful)
    for step in range(8):
        grads = random_grads(params)
        if step % 3 == 1:  # same values, transposed storage
            grads = [g.t().contiguous().t() if g.dim() == 2 else g for g in grads]
            assert not grads[0].is_contiguous()
        _step_both(params, ours, theirs, opt_f, opt_t, grads)
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
@isolated  # a misaligned vector access on a GPU ends the process's CUDA context
def test_grads_as_views_of_one_buffer_at_unaligned_offsets(name, backend, device):
    """Params of their own allocations (aligned), grads views of one flat buffer, as DDP's
    gradient_as_bucket_view lays them out: sizes 3, 5, ... put most views at offsets that are not
    a multiple of 4 elements, so a kernel that reads 4 elements at a time must see that from the
    grad's address (the views after the first are bound by address alone: Note [one hold per grad
    storage], grad_binding.h). Two param groups (two plans: the second begins at offset 62); the
    grads are new views every step and the same views; the kernels take every param (no
    fallback)."""
    spec = SPEC_BY_NAME[name]
    sizes = [3, 5, 37, 1, 16, 7, 64, 9]
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in sizes]
    ours, theirs = clone_params(params), clone_params(params)
    groups = lambda ps: [{"params": ps[:5]}, {"params": ps[5:], "lr": spec.lr / 2}]  # noqa: E731
    opt_f = spec.fastopt_cls(groups(ours), backend=backend, lr=spec.lr, **spec.stateful)
    opt_t = spec.torch_cls(groups(theirs), foreach=False, lr=spec.lr, **spec.stateful)
    flat = torch.empty(sum(sizes), device=device)
    for step in range(5):
        flat.copy_(torch.randn(sum(sizes), device=device))
        if step != 3:  # step 3 keeps the views of step 2 (new values)
            for p, view in zip(ours, flat.split(sizes)):
                p.grad = view
        for p, view in zip(theirs, flat.split(sizes)):
            p.grad = view.clone()
        opt_f.step()
        opt_t.step()
        assert_ran_on(opt_f, backend)
        assert opt_f.step_stats.kernel + opt_f.step_stats.reference == len(sizes), opt_f.step_stats
    assert [p.grad.storage_offset() for p in ours][1:3] == [3, 8]
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64], ids=["f32", "c64"])
def test_grads_as_views_of_two_buffers_in_turn(dtype, backend, device):
    """Grads that are views of one of two buffers, the buffer changing between params (A A A B A:
    the binding holds a grad of each run and binds the rest of a run by address, computed from
    the held grad's storage: Note [one hold per grad storage]), an empty view inside a run, and
    complex grads (bound through their real views). Every param is updated by the kernels, as
    torch.optim updates it."""
    skip_unsupported(backend, dtype)
    spec = SPEC_BY_NAME["Adam"]
    sizes = [3, 0, 5, 4, 2]
    from_b = {3}  # the params whose grads are views of buffer B
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype, device=device)) for n in sizes]
    ours, theirs = clone_params(params), clone_params(params)
    opt_f = spec.fastopt_cls(ours, backend=backend, lr=spec.lr, **spec.stateful)
    opt_t = spec.torch_cls(theirs, foreach=False, lr=spec.lr, **spec.stateful)
    for _ in range(3):
        buffers = [torch.randn(sum(sizes) + 1, dtype=dtype, device=device) for _ in range(2)]
        offsets = [1, 1]  # not at the buffers' start
        for i, (p, q, n) in enumerate(zip(ours, theirs, sizes)):
            k = int(i in from_b)
            p.grad = buffers[k][offsets[k]:offsets[k] + n]
            q.grad = p.grad.clone()
            offsets[k] += n
        opt_f.step()
        opt_t.step()
        assert_ran_on(opt_f, backend)
        assert opt_f.step_stats.kernel + opt_f.step_stats.reference == len(sizes), opt_f.step_stats
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


def test_grads_appear_and_vanish(backend, device):
    """Params gain and lose grads from step to step (frozen branches, set_to_none)."""
    params, ours, theirs, opt_f, opt_t = _pair("Adam", backend, device, weight_decay=0.1)

    def drop_grads(step):
        for i in range(len(params)):
            if (step + i) % 4 == 0:
                ours[i].grad = None
                theirs[i].grad = None

    lockstep([Side(opt_f, ours, backend=backend), Side(opt_t, theirs)], params, 9, before_step=drop_grads)
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


def test_group_hyperparameters_changed_between_steps(backend, device):
    """Hyperparameters and flags that need no new state (weight decay on, maximize, betas) may
    change between steps: the plan is reused and the new values apply."""
    params, ours, theirs, opt_f, opt_t = _pair("Adam", backend, device)
    for step in range(6):
        if step == 3:
            for opt in (opt_f, opt_t):
                opt.param_groups[0].update(weight_decay=0.1, maximize=True, betas=(0.8, 0.99))
        _step_both(params, ours, theirs, opt_f, opt_t)
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


BIG = 2**31 + 7  # elements: past every 32-bit element index


def test_a_tensor_of_more_than_2_31_elements(backend, device):
    """Adagrad on one bf16 tensor of 2^31 + 7 elements (12.9 GB with grad and state): the last
    elements, past any 32-bit index, get the same update as the first.

    From a zero accumulator the first step is ``p - lr * g / (|g| + eps)`` = ``p - lr * sign(g)``
    up to rounding, whatever the index."""
    if backend == "reference":
        pytest.skip("the reference backend works on fp32 copies (4x the memory)")
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton's interpreter would take hours over 2^31 elements (runs on a GPU)")
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else _mem_available()
    if free < 16 * 2**30:
        pytest.skip(f"needs 16 GiB of free {device} memory, {free / 2**30:.1f} GiB free")
    p = torch.nn.Parameter(torch.zeros(BIG, dtype=torch.bfloat16, device=device))
    p.grad = torch.ones(BIG, dtype=torch.bfloat16, device=device)
    p.grad[-3:] = -2.0
    opt = fastopt.Adagrad([p], lr=0.5, backend=backend)
    opt.step()
    head, tail = p.detach()[:4].float(), p.detach()[-3:].float()
    assert torch.equal(head, torch.full((4,), -0.5, device=device)), head
    assert torch.equal(tail, torch.full((3,), 0.5, device=device)), tail
    middle = p.detach()[2**31 - 2 : 2**31 + 2].float()
    assert torch.equal(middle, torch.full((4,), -0.5, device=device)), middle


def test_cpu_eager_steps_reuse_one_plan():
    """On the cpu backend, eager steps with fresh grads (set_to_none) reuse the compiled plan and
    bind the grads into it, rather than rebuilding pointer lists every step."""
    if "cpu" not in fastopt.available_backends("cpu"):
        pytest.skip("the compiled cpu backend is not built")
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 4097, 70000)]
    opt = fastopt.AdamW(params, backend="cpu", max_grad_norm=1.0)
    plans = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert (opt.step_stats.kernel, opt.step_stats.reference) == (3, 0)
        plans.append(opt._run.plan.buckets[0].run.plans[0].plan)
    assert plans[0] is plans[1] is plans[2]
