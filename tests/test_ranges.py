"""Note [adjacent tensors, one range] (csrc/cpu/multi_tensor.h): params, grads and state that lie
back to back (views of one buffer, the state buffer) are walked by the CPU kernels as one range.
The update is elementwise, so the results are bit for bit those of the same tensors apart."""

from __future__ import annotations

import pytest
import torch

import fastopt
from harness import assert_matches, set_grads
from specs import NAMES, SPEC_BY_NAME, clone_params

if fastopt.backends.why_unavailable("cpu", "cpu") is not None:
    pytest.skip("the cpu backend's kernels", allow_module_level=True)

# multiples of 16 bytes of float32, so that the state buffer (16-byte aligned) is packed as the
# params are; an empty param splits the range
SIZES = [4, 100, 0, 36, 12, 64]


def _update_chunks(opt):
    return [sp.plan.update_chunks for b in opt._run.plan.buckets for sp in b.run.plans]


def _grads(step):
    """Grads of step ``step``: all (1), param 4's absent (2), all (3: param 4's step count is now
    one behind its neighbours'), param 1's with a storage of its own (4)."""
    torch.manual_seed(step)
    grads = list(torch.randn(sum(SIZES)).split(SIZES))
    if step == 2:
        grads[4] = None
    return grads


# ranges the kernels walk in each step (the empty param's takes no chunk; an absent grad's tensor
# keeps a chunk, skipped): {0, 1} {3, 4, 5}; {0, 1} {3} {4} {5}; the same, as param 4's step
# count differs; {0} {1} {3} {4} {5}
EXPECTED_CHUNKS = {1: 2, 2: 4, 3: 4, 4: 5}


@pytest.mark.parametrize("extras", [{}, {"state_dtype": torch.bfloat16}], ids=["fp32", "bf16 state"])
@pytest.mark.parametrize("name", NAMES)
def test_adjacent_tensors_are_one_range(name, extras):
    spec = SPEC_BY_NAME[name]
    flat = torch.randn(sum(SIZES))
    together = [torch.nn.Parameter(v) for v in flat.clone().split(SIZES)]  # views of one buffer
    apart = clone_params(together)
    theirs = clone_params(together)
    make = lambda params: spec.fastopt_cls(params, backend="cpu", lr=spec.lr, **spec.stateful, **extras)
    opt_together, opt_apart = make(together), make(apart)
    opt_t = spec.torch_cls(theirs, foreach=False, lr=spec.lr, **spec.stateful)
    for step in (1, 2, 3, 4):
        grads = _grads(step)
        buffer = torch.cat([g for g in grads if g is not None])
        views = iter(buffer.split([s for s, g in zip(SIZES, grads) if g is not None]))
        for p, g in zip(together, grads):
            p.grad = None if g is None else next(views)
        if step == 4:
            together[1].grad = grads[1].clone()
        set_grads(apart, grads)
        set_grads(theirs, grads)
        for opt in (opt_together, opt_apart, opt_t):
            opt.step()
        assert opt_together.step_stats.kernel == sum(g is not None for g in grads)
        # stochastic rounding is keyed by the element's index in its own tensor: never joined
        joined = EXPECTED_CHUNKS[step] if not extras else len(SIZES) - 1
        assert _update_chunks(opt_together) == [joined], f"step {step}"
        assert _update_chunks(opt_apart) == [len(SIZES) - 1], f"step {step}"
        for p, q in zip(together, apart):
            assert torch.equal(p, q), f"step {step}: a param differs from its twin apart"
            for key, value in opt_apart.state[q].items():
                assert torch.equal(opt_together.state[p][key], value), f"step {step}: {key} differs"
    if not extras:
        assert_matches(opt_together, opt_t, together, theirs, torch.float32)
