"""Every torch.optim.lr_scheduler drives fastopt exactly as it drives torch.optim."""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as S

from harness import Side, assert_matches, lockstep
from specs import NAMES, SPEC_BY_NAME, clone_params, make_params

SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=1, factor=0.5),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=20),  # cycles betas/momentum
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=5), S.CosineAnnealingLR(o, T_max=15)], milestones=[5]
    ),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda epoch: 1.0 / (1 + epoch)),
}


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("name", [n for n in NAMES if n != "AdamW"])
def test_scheduler_matches_torch(name, sched, lr_kind, backend, device):
    if sched == "OneCycleLR" and name == "Adagrad":
        pytest.skip("Adagrad has no momentum/betas for OneCycleLR to cycle (torch refuses it too)")
    spec = SPEC_BY_NAME[name]
    kw = spec.stateful
    params = make_params(torch.float32, device)
    theirs, ours = clone_params(params), clone_params(params)

    def lr():
        return torch.tensor(0.01) if lr_kind == "tensor" else 0.01

    opt_t = spec.torch_cls(theirs, lr=lr(), foreach=False, **kw)
    opt_f = spec.fastopt_cls(ours, lr=lr(), backend=backend, **kw)
    sch_t, sch_f = SCHEDULERS[sched](opt_t), SCHEDULERS[sched](opt_f)

    def scheduler_steps(step):
        if sched == "ReduceLROnPlateau":
            metric = 1.0  # a plateau: the lr is cut every other step
            sch_t.step(metric), sch_f.step(metric)
        else:
            sch_t.step(), sch_f.step()
        assert [float(g["lr"]) for g in opt_f.param_groups] == [float(g["lr"]) for g in opt_t.param_groups]

    lockstep([Side(opt_t, theirs), Side(opt_f, ours, backend=backend)], params, after_step=scheduler_steps)
    assert_matches(opt_f, opt_t, ours, theirs, torch.float32)
