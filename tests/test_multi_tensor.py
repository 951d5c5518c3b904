"""Multi-tensor launches: tensors that span several chunks (and several programs), chunk
boundaries, many tensors in one group, and the launch count on a GPU."""

from __future__ import annotations

import pytest
import torch

from harness import Side, assert_matches, lockstep, run_lockstep
from specs import SPEC_BY_NAME

# Around the chunk sizes of the compiled backends (Triton: 16384 elements a program; CPU: 32768):
# one element short of, exactly at and one past a boundary, and a tensor of several chunks.
BOUNDARY_SIZES = [(16383,), (16384,), (16385,), (32769,), (70001,), (0,), (1,)]


@pytest.mark.parametrize("name,config", [
    ("Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("Adagrad", {"lr_decay": 0.1}),
    ("RMSprop", {"centered": True, "momentum": 0.5}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
])
def test_tensors_across_chunk_boundaries(name, config, backend, device):
    """Several programs update one tensor; its step count is bumped once per step (Note
    [one-launch step counts]), and every element matches torch."""
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in BOUNDARY_SIZES]
    opt_t, opt_f, theirs, ours = run_lockstep(
        SPEC_BY_NAME[name], config, dtype=torch.float32, device=device, backend=backend, steps=4,
        params=params, extras={"max_grad_norm": 50.0},
        before_torch_step=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 50.0),
    )
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)
    for state in opt_f.state.values():
        assert float(state.get("step", 4.0)) == 4.0  # (SGD keeps no count: its buffer's first step is checked by the match)


def test_many_small_tensors_in_one_group(backend, device):
    params = [torch.nn.Parameter(torch.randn(n % 7 + 1, device=device)) for n in range(300)]
    opt_t, opt_f, theirs, ours = run_lockstep(
        SPEC_BY_NAME["AdamW"], {}, dtype=torch.float32, device=device, backend=backend, steps=3, params=params,
    )
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clipped"])
def test_one_launch_per_step_plus_one_for_the_norm(clip, backend, device):
    """3,000 tensors: one update kernel, and one norm kernel when clipping (DESIGN, multi-tensor step)."""
    if device != "cuda" or backend == "reference":
        pytest.skip("launch counting is for the GPU kernels")
    from torch.profiler import ProfilerActivity, profile

    import fastopt

    params = [torch.nn.Parameter(torch.randn(4096, device=device)) for _ in range(3000)]
    opt = fastopt.Adam(params, backend=backend, max_grad_norm=1.0 if clip else None)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # builds state and the plan
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert len(kernels) == (2 if clip else 1), kernels


def _at_offset(n, offset, device):
    """A float32 tensor of n elements that starts ``offset`` elements into its storage (4 bytes per
    element: offset 1 is off any 16-byte boundary)."""
    return torch.randn(n + offset, device=device)[offset:]


@pytest.mark.parametrize("name,config", [
    ("Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", {}),
    ("Adagrad", {"lr_decay": 0.1}),
    ("RMSprop", {"centered": True, "momentum": 0.5}),
    ("SGD", {"momentum": 0.9, "weight_decay": 0.1}),
])
def test_tensors_off_16_byte_boundaries(name, config, backend, device):
    """Note [aligned bodies] (triton_kernels/common.py): a program whose tensors all keep 16-byte
    alignment runs an unmasked body and a masked tail, any other the masked loop: a param that
    starts one element into its storage, and an aligned param whose grad (assigned by hand) does,
    next to aligned ones of several BLOCKs plus a tail, with clipping (the norm kernel too); every
    element as torch's."""
    spec = SPEC_BY_NAME[name]
    sizes = [5000, 4097, 3000, 1024]
    base = [_at_offset(n, 1 if i == 1 else 0, device) for i, n in enumerate(sizes)]
    ours = [torch.nn.Parameter(t.clone() if i != 1 else _at_offset(sizes[1], 1, device).copy_(t))
            for i, t in enumerate(base)]
    theirs = [torch.nn.Parameter(t.clone()) for t in base]
    assert ours[1].data_ptr() % 16 != 0
    opt_f = spec.fastopt_cls(ours, backend=backend, lr=spec.lr, max_grad_norm=5.0, **config)
    opt_t = spec.torch_cls(theirs, foreach=False, lr=spec.lr, **config)

    def give_misaligned(params, grads):
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = _at_offset(sizes[i], 1, device).copy_(g) if i == 2 else g.clone()  # a misaligned grad
        assert params[2].grad.data_ptr() % 16 != 0

    def torch_step():
        torch.nn.utils.clip_grad_norm_(theirs, 5.0)  # the norm kernel reads the grads the same way
        opt_t.step()

    lockstep([Side(opt_f, ours, backend=backend, give=give_misaligned), Side(opt_t, theirs, step=torch_step)],
             steps=3, grads=lambda step: [torch.randn(n, device=device) for n in sizes])
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)
