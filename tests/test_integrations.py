"""fastopt inside the trainers people use: PyTorch Lightning and Hugging Face transformers.Trainer,
installed for real (`make test` installs them and sets FASTOPT_REQUIRE_INTEGRATIONS=1, so a missing
package fails the run there instead of skipping).

Each test trains the same tiny model twice in the framework, once with torch.optim and once with
fastopt (cpu backend, its compiled kernels), and compares the parameters; resume tests compare an
interrupted-and-resumed run with an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import fastopt
from harness import assert_same_params
from specs import TOL

REQUIRED = os.environ.get("FASTOPT_REQUIRE_INTEGRATIONS") == "1"


def _need(module: str):
    if REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module)


# fp32, a few steps: the two optimizers' arithmetic differs only in rounding (fused multiply-adds,
# per-step scalars in float64), which TOL[float32] (rtol 1e-5) bounds after tens of steps in
# test_optim; these runs are shorter.
FP32 = TOL[torch.float32]


# ------------------------------------------------------------------------------------------------
# PyTorch Lightning


def _lightning_module(L, opt_factory, *, seed=0):
    class Regressor(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            # no bias before the BatchNorm: its grad would be rounding noise, which Adam's
            # normalization turns into steps of size lr in either direction
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16, bias=False), torch.nn.BatchNorm1d(16),
                                           torch.nn.ReLU(),
                                           torch.nn.Linear(16, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x).float(), y)

        def configure_optimizers(self):
            opt = opt_factory(self.parameters())
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Regressor()


def _loader():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 6, generator=g)
    y = (x[:, :1] * 3 - x[:, 1:2]).mul(5)  # large grads early: clipping is active
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _fit(L, module, tmp_path, *, max_epochs=2, ckpt_path=None, callbacks=(), **trainer_args):
    # not deterministic=True: it sets process-wide flags (torch.use_deterministic_algorithms, cuDNN's),
    # which leak into the other tests of this worker and which torch's test utilities forbid
    # (disable_global_flags); CPU training here is deterministic without them
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                        default_root_dir=str(tmp_path), **trainer_args)
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer


def _adamw(library, **extras):
    cls = fastopt.AdamW if library == "fastopt" else torch.optim.AdamW
    kwargs = {"backend": "cpu", **extras} if library == "fastopt" else {"foreach": False}
    return lambda params: cls(params, lr=0.05, weight_decay=0.01, **kwargs)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("clipping", ["none", "lightning", "fastopt"])
def test_lightning_matches_torch(precision, clipping, tmp_path):
    """configure_optimizers with a fastopt optimizer and a scheduler; clipping by Lightning's
    gradient_clip_val or inside fastopt's step; fp32 and Lightning's bf16 autocast plugin (before
    the fix, "bf16-mixed" with gradient_clip_val refused fastopt as a 'fused' optimizer)."""
    L = _need("lightning")
    clip = {} if clipping == "none" else {"gradient_clip_val": 1.0}
    ours = _lightning_module(L, _adamw("fastopt", **({"max_grad_norm": 1.0} if clipping == "fastopt" else {})))
    theirs = _lightning_module(L, _adamw("torch"))
    _fit(L, theirs, tmp_path / "torch", precision=precision, **clip)
    _fit(L, ours, tmp_path / "fastopt", precision=precision,
         **({} if clipping == "fastopt" else clip))

    opt = ours.optimizers().optimizer
    assert isinstance(opt, fastopt.AdamW) and opt.step_stats.kernel > 0 and opt.step_stats.reference == 0
    if clipping == "fastopt":
        assert opt.last_grad_norm is not None and float(opt.last_grad_norm) > 0
    # bf16-mixed: both runs compute the same bf16 forward and fp32 grads; the step is fp32
    assert_same_params(list(ours.parameters()), list(theirs.parameters()), **FP32)
    assert opt.param_groups[0]["lr"] == theirs.optimizers().optimizer.param_groups[0]["lr"]


def test_lightning_checkpoint_and_resume(tmp_path):
    """ModelCheckpoint saves fastopt's state dict; Trainer.fit(ckpt_path=...) resumes from it and
    ends bit for bit where an uninterrupted run ends."""
    L = _need("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    factory = _adamw("fastopt", max_grad_norm=1.0)
    straight = _lightning_module(L, factory)
    _fit(L, straight, tmp_path / "straight", max_epochs=4)

    first = _lightning_module(L, factory)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _fit(L, first, tmp_path / "first", max_epochs=2, callbacks=[ckpt])
    saved = torch.load(ckpt.last_model_path, weights_only=False)["optimizer_states"][0]
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # torch's format

    resumed = _lightning_module(L, factory, seed=1)  # other initial weights: all must come from the checkpoint
    _fit(L, resumed, tmp_path / "resumed", max_epochs=4, ckpt_path=ckpt.last_model_path,
         callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt2"))])
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)
    sa, sb = resumed.optimizers().optimizer.state_dict(), straight.optimizers().optimizer.state_dict()
    for pid in sb["state"]:
        for key in sb["state"][pid]:
            assert torch.equal(sa["state"][pid][key], sb["state"][pid][key]), (pid, key)


def test_lightning_helper_sees_no_fused_unscaling():
    """Lightning decides from this whether it may clip and whether to unscale first."""
    _need("lightning")
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    assert not _optimizer_handles_unscaling(fastopt.AdamW([torch.nn.Parameter(torch.zeros(1))]))


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers.Trainer


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, length=12, vocab=64):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _hf_model(transformers):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)  # built from the config: no download


def _hf_train(transformers, tmp_path, library, *, trainer_clip, fastopt_clip=None, max_steps=8, save_steps=None,
              resume=None):
    model = _hf_model(transformers)
    if library == "fastopt":
        opt = fastopt.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, backend="cpu", max_grad_norm=fastopt_clip)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=max_steps)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, max_grad_norm=trainer_clip,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=[], use_cpu=True,
        logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    return model, opt, trainer


@pytest.mark.parametrize("clipping", ["trainer", "fastopt"])
def test_hf_trainer_matches_torch(clipping, tmp_path):
    """optimizers=(fastopt.AdamW(...), scheduler); clipping by the Trainer (max_grad_norm=1.0), or
    by fastopt with the Trainer's off (max_grad_norm=0: the Trainer still computes and logs the
    norm, see the README's Frameworks section)."""
    transformers = _need("transformers")
    theirs, _, _ = _hf_train(transformers, tmp_path / "torch", "torch", trainer_clip=1.0)
    if clipping == "trainer":
        ours, opt, trainer = _hf_train(transformers, tmp_path / "fastopt", "fastopt", trainer_clip=1.0)
    else:
        ours, opt, trainer = _hf_train(transformers, tmp_path / "fastopt", "fastopt", trainer_clip=0.0,
                                       fastopt_clip=1.0)
    assert opt.step_stats.kernel > 0 and opt.step_stats.reference == 0
    assert all("grad_norm" in e for e in trainer.state.log_history if "loss" in e)
    assert_same_params(list(ours.parameters()), list(theirs.parameters()), **FP32)


def test_hf_trainer_save_and_resume(tmp_path):
    """The Trainer's checkpoint holds fastopt's state dict (torch.save of state_dict()); a new
    Trainer with a new fastopt optimizer resumes from it and ends bit for bit where an
    uninterrupted run ends."""
    transformers = _need("transformers")
    straight, opt_s, _ = _hf_train(transformers, tmp_path / "straight", "fastopt", trainer_clip=1.0)
    _hf_train(transformers, tmp_path / "run", "fastopt", trainer_clip=1.0, save_steps=4)
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert (ckpt / "optimizer.pt").exists()
    resumed, opt_r, _ = _hf_train(transformers, tmp_path / "run", "fastopt", trainer_clip=1.0, save_steps=4,
                                  resume=str(ckpt))
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)
    assert float(opt_r.state_dict()["state"][0]["step"]) == 8
    assert opt_r.param_groups[0]["lr"] == opt_s.param_groups[0]["lr"]
