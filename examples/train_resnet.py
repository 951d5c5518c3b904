"""Train a small ResNet on scikit-learn's digits with fastopt: the faster-training recipe in one file.

    python examples/train_resnet.py                      # fastopt AdamW, one-cycle schedule
    python examples/train_resnet.py --compare            # torch.optim against fastopt, one plot
    python examples/train_resnet.py --classes 0-4 --out runs/half        # train on half the classes
    python examples/train_resnet.py --finetune runs/half/best.pt        # then transfer to all ten

The data set (1,797 8x8 images of handwritten digits, 10 classes) ships inside scikit-learn, so
this runs offline. Every heuristic of the recipe is here and has a switch:

  He init for the convolutions, Xavier for the head ............. --init he|torch
  fastopt's optimizers ........................................... --optimizer adamw|adam|rmsprop|adagrad|sgd
  SGD with (Nesterov) momentum, the usual vision baseline ........ --optimizer sgd --momentum --nesterov
  learning-rate schedules (torch's) .............................. --schedule step|exp|onecycle|cosine-restarts|none
  batch normalization, fused with its ReLU ....................... --no-fuse to keep them apart
  mini-batches ................................................... --batch-size
  gradient clipping inside the optimizer step .................... --max-grad-norm (0: off)
  skip connections ............................................... the residual blocks below
  early stopping on the validation loss .......................... --patience (0: off)
  checkpoints of the best model and of the last state ........... --out, --resume
  mixed precision: bf16 params, fp32 master weights, autocast ... --bf16
  bf16 params without master weights ............................ --bf16 --state-dtype bfloat16
                                                                   --compensation kahan|stochastic
  a data pipeline with worker processes .......................... --workers
  transfer learning from a checkpoint ............................ --finetune CKPT

At the end it writes a PNG of the loss and accuracy curves and prints the time per epoch. With
--compare it trains twice from the same seed, once with torch.optim (clipping by
torch.nn.utils.clip_grad_norm_, BatchNorm and ReLU as separate modules) and once with fastopt, and
plots both runs in one PNG. With --compare-precision it trains bf16 params four ways (fp32 master
weights; bf16 state with Kahan compensation; bf16 state with stochastic rounding; plain bf16
rounded to nearest: examples/precision_modes.py) and plots their validation losses.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastopt  # noqa: E402
from fastopt.nn import fuse_bn_relu  # noqa: E402
from precision_modes import MODES, add_precision_flags, extras_from_flags, mode_flags, plot_losses  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Settings


@dataclass
class Config:
    optimizer: str = "adamw"
    lr: float = 3e-3  # --lr's default: this, or SGD_LR for --optimizer sgd
    momentum: float = 0.9  # SGD's (the adaptive optimizers have their own betas/alpha)
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    epochs: int = 30
    batch_size: int = 64
    max_grad_norm: float = 1.0  # 0: no clipping
    patience: int = 8  # epochs without a better validation loss before stopping; 0: never stop
    init: str = "he"
    fuse: bool = True
    bf16: bool = False
    # how fastopt stores the params and state (examples/precision_modes.py): with bf16, fp32
    # master weights unless master_weights=False or a compensation stands in for them
    state_dtype: Optional[str] = None  # "bfloat16": bf16 moments, stochastic rounding
    compensation: Optional[str] = None  # "kahan" | "stochastic", for the bf16 params
    master_weights: bool = True
    width: int = 16
    upscale: int = 1  # 2: 16x16 images (bilinear), for a deeper look at the same digits
    classes: str = "0-9"
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    out: str = "runs/digits"
    resume: bool = False
    finetune: Optional[str] = None
    backbone_lr_scale: float = 1.0  # fine-tuning: the pretrained layers learn at lr times this
    library: str = "fastopt"  # or "torch": torch.optim, clip_grad_norm_, unfused BatchNorm
    # for tests and demos: stop after this many optimizer steps, or (like a killed process)
    # after this many epochs without finishing the run
    max_steps: Optional[int] = None
    interrupt_after: Optional[int] = None
    quiet: bool = False


_CLASSES = {"adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "adagrad": "Adagrad", "sgd": "SGD"}
SGD_LR = 0.05  # SGD's step is lr * grad, not lr * a normalized grad: a larger lr than the adaptive ones


def parse_args(argv: Optional[list[str]] = None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--optimizer", choices=sorted(_CLASSES), default=d.optimizer)
    p.add_argument("--lr", type=float, default=None, help=f"default: {d.lr}, {SGD_LR} with --optimizer sgd")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD's momentum")
    p.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", choices=["step", "exp", "onecycle", "cosine-restarts", "none"], default=d.schedule)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--init", choices=["he", "torch"], default=d.init)
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep BatchNorm and ReLU apart")
    p.add_argument("--bf16", action="store_true", help="bf16 params with fp32 master weights, bf16 autocast")
    add_precision_flags(p, "with --bf16: the bf16 params stepped as they are (round to nearest)")
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--upscale", type=int, default=d.upscale)
    p.add_argument("--classes", default=d.classes, help="the digits to train on: '0-9', '0-4', '1,3,5'")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", default=d.out, help="directory for checkpoints and the plot")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last state")
    p.add_argument("--finetune", metavar="CKPT", help="start from this checkpoint's layers, with a new head")
    p.add_argument("--backbone-lr-scale", type=float, default=d.backbone_lr_scale)
    p.add_argument("--library", choices=["fastopt", "torch"], default=d.library)
    p.add_argument("--compare", action="store_true", help="train with torch.optim and with fastopt; one plot")
    p.add_argument("--compare-precision", action="store_true",
                   help="bf16 params trained the four ways of precision_modes.py; one plot")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--interrupt-after", type=int, default=None, metavar="EPOCHS",
                   help="stop as a killed run would, after this many epochs (then try --resume)")
    p.add_argument("--quiet", action="store_true")
    args = vars(p.parse_args(argv))
    compare = "precision" if args.pop("compare_precision") else args.pop("compare")
    args.pop("compare", None)
    if args["lr"] is None:
        args["lr"] = SGD_LR if args["optimizer"] == "sgd" else d.lr
    return Config(**args), compare


# ------------------------------------------------------------------------------------------------
# Data: scikit-learn's digits, split once (70/15/15, stratified by a seeded permutation)


def parse_classes(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(out))


def load_data(cfg: Config) -> dict[str, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    if cfg.upscale > 1:
        x = F.interpolate(x, scale_factor=cfg.upscale, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(1234)  # the split never changes with --seed
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = n_test = round(0.15 * len(idx))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    keep = torch.tensor(parse_classes(cfg.classes))
    mean, std = x[torch.cat(parts["train"])].mean(), x[torch.cat(parts["train"])].std()
    data = {}
    for name, idx in parts.items():
        idx = torch.cat(idx).sort().values
        idx = idx[torch.isin(y[idx], keep)]
        data[name] = TensorDataset((x[idx] - mean) / std, y[idx])
    return data


class EpochShuffle(torch.utils.data.Sampler):
    """A new order every epoch, drawn from (seed, epoch) only, as DistributedSampler.set_epoch does."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


# ------------------------------------------------------------------------------------------------
# Model: conv -> BatchNorm -> ReLU blocks with residual adds (a ResNet for 8x8 inputs)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)  # fuse_bn_relu folds bn1 + relu1 into one module
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)  # feeds the residual add: stays a plain BatchNorm
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, stride=2), BasicBlock(4 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(x.mean((2, 3)))  # global average pool (its CUDA backward is deterministic)


def init_weights(model: nn.Module, how: str) -> None:
    """He (Kaiming) init for the convolutions, which feed ReLUs; Xavier for the linear head, which
    does not; BatchNorm at weight 1, bias 0, except the last BatchNorm of each residual branch at
    weight 0, so that every block starts as the identity (Goyal et al., 2017)."""
    if how != "he":
        return  # torch's defaults
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


# ------------------------------------------------------------------------------------------------
# Optimizer, schedule, early stopping


def param_groups(model: ResNet, cfg: Config) -> list[dict]:
    """No weight decay on BatchNorm and biases (as is usual), and, when fine-tuning, the pretrained
    layers in groups of their own, at lr * backbone_lr_scale (--backbone-lr-scale 0.1 for the
    gentle fine-tuning of a large pretrained model; here the new task is near enough to train
    everything at the full rate)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        pretrained = cfg.finetune is not None and not name.startswith("head.")
        groups.setdefault((p.ndim > 1, pretrained), []).append(p)
    return [
        {"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
         "lr": cfg.lr * (cfg.backbone_lr_scale if pretrained else 1.0)}
        for (decay, pretrained), ps in sorted(groups.items())
    ]


def make_optimizer(model: ResNet, cfg: Config) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    extra = {"betas": (0.9, 0.99)} if cfg.optimizer.startswith("adam") else {}
    if cfg.optimizer == "sgd":
        extra = {"momentum": cfg.momentum, "nesterov": cfg.nesterov}
    if cfg.library == "torch":
        return getattr(torch.optim, _CLASSES[cfg.optimizer])(groups, lr=cfg.lr, **extra)
    # fastopt: the same arguments, plus clipping inside the step and fp32 masters (or another
    # precision mode) for bf16 params
    return getattr(fastopt, _CLASSES[cfg.optimizer])(
        groups, lr=cfg.lr, **extra,
        max_grad_norm=cfg.max_grad_norm or None,
        **extras_from_flags(cfg.state_dtype, cfg.compensation, cfg.bf16 and cfg.master_weights),
    )


def make_schedule(opt: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    """Returns (scheduler, whether it steps per batch); None for a constant rate."""
    S = torch.optim.lr_scheduler
    if cfg.schedule == "step":
        return S.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.3), False
    if cfg.schedule == "exp":
        return S.ExponentialLR(opt, gamma=0.9), False
    if cfg.schedule == "onecycle":
        max_lr = [g["lr"] for g in opt.param_groups]
        return S.OneCycleLR(opt, max_lr=max_lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch), True
    if cfg.schedule == "cosine-restarts":
        return S.CosineAnnealingWarmRestarts(opt, T_0=max(1, cfg.epochs // 4) * steps_per_epoch, T_mult=2), True
    return None, False


@dataclass
class EarlyStopping:
    """Stop when the validation loss has not improved by more than ``min_delta`` for ``patience``
    epochs in a row; ``patience=0`` never stops."""

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, loss: float, epoch: int) -> tuple[bool, bool]:
        """Returns (improved, stop)."""
        if loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = loss, epoch, 0
            return True, False
        self.bad_epochs += 1
        return False, self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# ------------------------------------------------------------------------------------------------
# Training


@dataclass
class History:
    step_loss: list = field(default_factory=list)  # every optimizer step's training loss
    train_loss: list = field(default_factory=list)  # per epoch, then the same for the others
    train_acc: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    epoch_time: list = field(default_factory=list)  # seconds of training per epoch
    test_acc: Optional[float] = None
    stopped_early_at: Optional[int] = None
    # how the last step updated the params (fastopt: compiled kernels, or a visible fallback to
    # the reference rules) and how many BatchNorm+ReLU pairs run as one fused module
    last_step: dict = field(default_factory=dict)
    fused_bn_relu: int = 0


def pick_device(name: str) -> torch.device:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        # the same kernels on every run, so that --resume continues bit for bit on a GPU too
        # (fastopt's own kernels are deterministic)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return device


def build(cfg: Config, num_classes: int, device: torch.device) -> ResNet:
    torch.manual_seed(cfg.seed)
    model = ResNet(num_classes, cfg.width)
    init_weights(model, cfg.init)
    if cfg.finetune:  # transfer learning: every layer but the head from the checkpoint
        ckpt = torch.load(cfg.finetune, map_location="cpu", weights_only=True)
        body = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}
        missing, _ = model.load_state_dict(body, strict=False)
        assert all(k.startswith("head.") for k in missing), missing
    if cfg.library == "fastopt" and cfg.fuse:
        fuse_bn_relu(model)  # same parameters and state-dict keys, one kernel per BatchNorm+ReLU
    model.to(device)
    if cfg.bf16:
        # bf16 params (half the memory and traffic); the optimizer keeps fp32 master copies, so
        # small updates are not rounded away. BatchNorm stays fp32, as autocast expects.
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.to(torch.bfloat16)
    return model


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, cfg: Config) -> tuple[float, float]:
    model.eval()
    total, correct, loss = 0, 0, 0.0
    with torch.no_grad(), autocast(device, cfg):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
    return loss / total, correct / total


def autocast(device: torch.device, cfg: Config):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


def train(cfg: Config) -> History:
    device = pick_device(cfg.device)
    data = load_data(cfg)
    classes = parse_classes(cfg.classes)
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[classes] = torch.arange(len(classes))  # labels 0..k-1 for a subset of the digits

    def relabel(ds: TensorDataset) -> TensorDataset:
        return TensorDataset(ds.tensors[0], remap[ds.tensors[1]])

    pin = device.type == "cuda"
    # One loader for the whole run, its worker processes kept between epochs; the order of each
    # epoch is a function of (seed, epoch) alone, so a resumed run sees the batches an
    # uninterrupted one would. (The loader's own generator only seeds the workers, which draw no
    # random numbers here; it keeps the loader off the global RNG.)
    sampler = EpochShuffle(len(data["train"]), cfg.seed)
    train_loader = DataLoader(relabel(data["train"]), cfg.batch_size, sampler=sampler, drop_last=True,
                              num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=pin,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(relabel(data["val"]), 256, pin_memory=pin)
    test_loader = DataLoader(relabel(data["test"]), 256, pin_memory=pin)

    model = build(cfg, len(classes), device)
    opt = make_optimizer(model, cfg)
    sched, per_batch = make_schedule(opt, cfg, len(train_loader))
    stopper = EarlyStopping(cfg.patience)
    hist = History()
    start = 0
    os.makedirs(cfg.out, exist_ok=True)
    last_path, best_path = os.path.join(cfg.out, "last.pt"), os.path.join(cfg.out, "best.pt")
    if cfg.resume:
        ckpt = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        stopper.load_state_dict(ckpt["early_stopping"])
        hist = History(**ckpt["history"])
        start = ckpt["epoch"] + 1
        log(cfg, f"resumed from {last_path} after epoch {ckpt['epoch'] + 1}")

    steps = len(hist.step_loss)
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        seen, correct, loss_sum, losses = 0, 0, torch.zeros((), device=device), []
        batches = progress(train_loader, cfg, f"epoch {epoch + 1}/{cfg.epochs}")
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, cfg):
                logits = model(x.to(torch.bfloat16) if cfg.bf16 else x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.library == "torch" and cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()  # fastopt: the clipping is inside
            if sched is not None and per_batch:
                sched.step()
            loss_sum += loss.detach() * len(y)  # no host sync per step
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            losses.append(loss.detach())
            steps += 1
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        hist.epoch_time.append(time.perf_counter() - t0)
        hist.step_loss.extend(torch.stack(losses).tolist())  # one host sync per epoch
        if isinstance(opt, fastopt.optim.FusedOptimizer):
            hist.last_step = asdict(opt.step_stats)
        hist.fused_bn_relu = sum(isinstance(m, fastopt.nn.BatchNormReLU2d) for m in model.modules())
        hist.lr.append(max(g["lr"] for g in opt.param_groups))  # the head's, when fine-tuning
        if sched is not None and not per_batch:
            sched.step()
        hist.train_loss.append(float(loss_sum) / max(seen, 1))
        hist.train_acc.append(float(correct) / max(seen, 1))
        vl, va = evaluate(model, val_loader, device, cfg)
        hist.val_loss.append(vl)
        hist.val_acc.append(va)
        improved, stop = stopper.update(vl, epoch)
        log(cfg, f"epoch {epoch + 1:3d}  train loss {hist.train_loss[-1]:.4f} acc {hist.train_acc[-1]:.3f}  "
                 f"val loss {vl:.4f} acc {va:.3f}  lr {hist.lr[-1]:.2e}  {hist.epoch_time[-1]:.2f} s"
                 + ("  *" if improved else ""))
        if improved:
            torch.save({"model": model.state_dict(), "epoch": epoch, "val_loss": vl, "classes": classes}, best_path)
        if stop:
            hist.stopped_early_at = epoch + 1
            log(cfg, f"early stop: no better validation loss for {stopper.patience} epochs "
                     f"(best {stopper.best:.4f} after epoch {stopper.best_epoch + 1})")
        torch.save({
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "early_stopping": stopper.state_dict(), "history": asdict(hist), "epoch": epoch,
            "config": asdict(cfg),
        }, last_path)
        done = stop or (cfg.max_steps is not None and steps >= cfg.max_steps)
        if done or (cfg.interrupt_after is not None and epoch + 1 >= cfg.interrupt_after and epoch + 1 < cfg.epochs):
            if not done:
                log(cfg, f"interrupted after epoch {epoch + 1}: continue with --resume")
                return hist
            break

    if os.path.exists(best_path) and cfg.max_steps is None:
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True)["model"])
    hist.test_acc = evaluate(model, test_loader, device, cfg)[1]
    return hist


def log(cfg: Config, msg: str) -> None:
    if not cfg.quiet:
        print(msg, flush=True)


def progress(it, cfg: Config, desc: str):
    if cfg.quiet:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=False, unit="batch", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------
# Report


def time_per_epoch(hist: History) -> float:
    """Median seconds per epoch, without the first epoch (worker start-up, one-time set-up)."""
    times = hist.epoch_time[1:] or hist.epoch_time
    return statistics.median(times)


def plot(runs: dict[str, History], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, h), color in zip(runs.items(), ["tab:blue", "tab:orange"]):
        epochs = range(1, len(h.train_loss) + 1)
        label = f"{name} ({time_per_epoch(h):.2f} s/epoch)"
        ax_loss.plot(epochs, h.train_loss, color=color, label=f"{label}, train")
        ax_loss.plot(epochs, h.val_loss, color=color, ls="--", label=f"{name}, validation")
        ax_acc.plot(epochs, h.train_acc, color=color, label=f"{name}, train")
        ax_acc.plot(epochs, h.val_acc, color=color, ls="--", label=f"{name}, validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_precision(cfg: Config) -> dict[str, History]:
    """bf16 params trained the four ways of precision_modes.py, from the same seed and data order,
    every epoch of each (no early stop, so that the curves end at the same epoch)."""
    return {mode: train(replace(cfg, bf16=True, library="fastopt", patience=0, out=os.path.join(cfg.out, mode),
                                **mode_flags(mode)))
            for mode in MODES}


def main(argv: Optional[list[str]] = None) -> dict[str, History]:
    cfg, compare = parse_args(argv)
    if compare == "precision":
        runs = compare_precision(cfg)
        path = os.path.join(cfg.out, "precision.png")
        try:
            plot_losses({m: (list(range(1, len(h.val_loss) + 1)), h.val_loss) for m, h in runs.items()}, path,
                        "ResNet on digits, bf16 params", "epoch")
            print(f"plot: {path}")
        except ImportError:
            print("matplotlib is not installed: no plot")
        for mode, h in runs.items():
            rel = runs["master"].val_loss[-1]
            print(f"{MODES[mode][0]:34s} final val loss {h.val_loss[-1]:.4f} ({100 * (h.val_loss[-1] / rel - 1):+.2f}% "
                  f"vs (a))  test accuracy {h.test_acc:.4f}")
        return runs
    if compare:
        # the same seed and data order for both; torch first, so neither gets a warmer cache
        runs = {
            "torch.optim": train(replace(cfg, library="torch", out=os.path.join(cfg.out, "torch"))),
            "fastopt": train(replace(cfg, library="fastopt", out=os.path.join(cfg.out, "fastopt"))),
        }
    else:
        runs = {cfg.library: train(cfg)}
    if any(h.test_acc is None for h in runs.values()):  # interrupted: nothing to report yet
        return runs
    path = os.path.join(cfg.out, "compare.png" if compare else "curves.png")
    try:
        plot(runs, path)
        print(f"plot: {path}")
    except ImportError:
        print("matplotlib is not installed: no plot")
    for name, h in runs.items():
        print(f"{name:12s} test accuracy {h.test_acc:.4f}  final val loss {h.val_loss[-1]:.4f}  "
              f"{time_per_epoch(h):.3f} s per epoch ({len(h.train_loss)} epochs"
              + (", stopped early" if h.stopped_early_at else "") + ")")
    if compare:
        t, f = runs["torch.optim"], runs["fastopt"]
        n = min(len(t.val_loss), len(f.val_loss))
        gap = max(abs(a - b) for a, b in zip(t.val_loss[:n], f.val_loss[:n]))
        print(f"fastopt is {time_per_epoch(t) / time_per_epoch(f):.2f}x torch.optim's time per epoch; "
              f"largest gap between the two validation-loss curves: {gap:.4f}")
    return runs


if __name__ == "__main__":
    main()
