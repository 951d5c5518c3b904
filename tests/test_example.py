"""examples/train_resnet.py, run the way its users run it (its train() and main(), the real data
set from scikit-learn): torch.optim against fastopt, interrupt and resume, early stopping."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from dataclasses import replace

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_resnet.py"
if not EXAMPLE.exists():  # the installed-package run (CI's second environment) has the tests only
    pytest.skip(f"{EXAMPLE} is not here", allow_module_level=True)
if os.environ.get("FASTOPT_REQUIRE_INTEGRATIONS") != "1":
    pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("train_resnet", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _config(ex, tmp_path, **kw):
    # width 8 and 3 epochs keep each run to seconds on 2 cores; the recipe is the default one;
    # on the CPU on every machine (cpu kernels), where convolutions are deterministic
    return ex.Config(**{"width": 8, "epochs": 3, "workers": 0, "quiet": True, "out": str(tmp_path),
                        "device": "cpu", **kw})


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop", "sgd"])
def test_fastopt_gives_torch_optims_losses(ex, tmp_path, optimizer):
    """The first 12 steps of the recipe (one-cycle schedule, clipping at 1.0, two param groups),
    torch.optim + clip_grad_norm_ + separate BatchNorm and ReLU against fastopt with fused
    BatchNorm+ReLU: the same training losses. fp32 throughout; what may differ is the order of
    fp32 sums (BatchNorm statistics, the clip norm) and fused multiply-adds in the update, each
    ~1e-7 relative, compounded over 12 steps of a well-conditioned model: rtol 1e-4."""
    cfg = _config(ex, tmp_path, optimizer=optimizer, max_steps=12, **({"lr": ex.SGD_LR} if optimizer == "sgd" else {}))
    theirs = ex.train(replace(cfg, library="torch", out=str(tmp_path / "torch")))
    ours = ex.train(replace(cfg, library="fastopt", out=str(tmp_path / "fastopt")))
    assert len(ours.step_loss) == len(theirs.step_loss) == 12
    torch.testing.assert_close(torch.tensor(ours.step_loss), torch.tensor(theirs.step_loss), rtol=1e-4, atol=0)
    assert ours.last_step["kernel"] > 0 and ours.last_step["reference"] == 0, ours.last_step
    # the stem's and each of the 6 blocks' first BatchNorm; the others feed residual adds
    assert ours.fused_bn_relu == 7 and theirs.fused_bn_relu == 0
    assert ours.step_loss[-1] < ours.step_loss[0]


def test_interrupted_and_resumed_run_is_the_uninterrupted_run(ex, tmp_path):
    """--interrupt-after 1 then --resume (checkpoint of model, optimizer, scheduler, early
    stopping and history after each epoch) gives the uninterrupted run's losses bit for bit,
    with the data loader's worker processes in play."""
    cfg = _config(ex, tmp_path, workers=2, patience=0)
    straight = ex.train(replace(cfg, out=str(tmp_path / "straight")))
    first = ex.train(replace(cfg, out=str(tmp_path / "resumed"), interrupt_after=1))
    assert len(first.train_loss) == 1 and first.test_acc is None
    resumed = ex.train(replace(cfg, out=str(tmp_path / "resumed"), resume=True))
    assert len(resumed.train_loss) == 3
    assert resumed.step_loss == straight.step_loss
    assert resumed.val_loss == straight.val_loss
    assert resumed.test_acc == straight.test_acc


def test_early_stopping_rule(ex):
    stop = ex.EarlyStopping(patience=2)
    script = [1.0, 0.8, 0.9, 0.7, 0.75, 0.71]
    events = [stop.update(v, epoch) for epoch, v in enumerate(script)]
    assert [improved for improved, _ in events] == [True, True, False, True, False, False]
    assert [s for _, s in events] == [False, False, False, False, False, True]
    assert stop.best == 0.7 and stop.best_epoch == 3
    assert not any(s for _, s in (ex.EarlyStopping(patience=0).update(1.0, e) for e in range(5)))


def test_early_stopping_stops_the_run_and_keeps_the_best_model(ex, tmp_path, monkeypatch):
    """A scripted validation loss (best at epoch 2, then worse for `patience` epochs): the run
    stops after epoch 2 + patience, and best.pt holds the model of epoch 2."""
    script = [0.9, 0.5, 0.6, 0.7, 0.4, 0.3]  # 0.4 at epoch 5 would count only if it ran on
    real, seen = ex.evaluate, []

    def fake_evaluate(model, loader, device, cfg):
        if len(seen) == len(script):
            return real(model, loader, device, cfg)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return script[len(seen) - 1], 0.5

    monkeypatch.setattr(ex, "evaluate", fake_evaluate)
    hist = ex.train(_config(ex, tmp_path, epochs=6, patience=2))
    assert hist.stopped_early_at == 4 and len(hist.val_loss) == 4
    assert hist.val_loss == [0.9, 0.5, 0.6, 0.7]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 1
    for k, v in seen[1].items():
        assert torch.equal(best["model"][k], v), k


@pytest.mark.parametrize("argv,want", [
    ([], dict(master_weights=False, state_dtype=None, compensation=None)),
    (["--bf16"], dict(master_weights=True, state_dtype=None, compensation=None)),
    (["--bf16", "--no-master-weights"], dict(master_weights=False, state_dtype=None, compensation=None)),
    (["--bf16", "--state-dtype", "bfloat16", "--compensation", "kahan"],
     dict(master_weights=False, state_dtype=torch.bfloat16, compensation="kahan")),
    (["--bf16", "--state-dtype", "bfloat16", "--compensation", "stochastic"],
     dict(master_weights=False, state_dtype=torch.bfloat16, compensation="stochastic")),
    (["--state-dtype", "bfloat16"], dict(master_weights=False, state_dtype=torch.bfloat16, compensation=None)),
])
def test_precision_flags_reach_the_optimizer(ex, tmp_path, argv, want):
    """--bf16, --no-master-weights, --state-dtype and --compensation become the optimizer's
    master_weights, state_dtype and compensation (a compensation stands in for the masters)."""
    cfg, compare = ex.parse_args(argv + ["--width", "8", "--out", str(tmp_path)])
    assert compare is False
    opt = ex.make_optimizer(ex.build(cfg, 10, torch.device("cpu")), cfg)
    got = {k: getattr(opt._options, k) for k in want}
    assert got == want, (argv, got)


def test_compare_precision_trains_the_four_modes(ex, tmp_path, monkeypatch):
    """--compare-precision runs train() once per mode of precision_modes.py, bf16 params each,
    with that mode's flags, and reports every run."""
    seen = []

    def fake_train(cfg):
        seen.append((cfg.bf16, cfg.master_weights, cfg.state_dtype, cfg.compensation, cfg.patience))
        return ex.History(val_loss=[1.0, 0.5], test_acc=0.9)

    monkeypatch.setattr(ex, "train", fake_train)
    runs = ex.main(["--compare-precision", "--out", str(tmp_path)])
    assert list(runs) == ["master", "kahan", "stochastic", "nearest"]
    assert seen == [(True, True, None, None, 0), (True, False, "bfloat16", "kahan", 0),
                    (True, False, "bfloat16", "stochastic", 0), (True, False, None, None, 0)]
