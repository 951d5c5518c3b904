"""A small character-level transformer language model with bf16 params, trained with fastopt.

    python examples/train_char_lm.py                                  # bf16 params, fp32 master weights
    python examples/train_char_lm.py --state-dtype bfloat16 --compensation kahan
    python examples/train_char_lm.py --state-dtype bfloat16 --compensation stochastic
    python examples/train_char_lm.py --no-master-weights               # plain bf16, round to nearest
    python examples/train_char_lm.py --compare-precision               # the four above, one plot

The text is the Python source of the installed torch package (its .py files in path order, 16 MB
by default, more than the default run reads once: no text is seen twice, so the validation loss
measures the optimizer rather than overfitting), so this runs offline on every machine that has
torch; the tokens are its bytes. The model is a
pre-LayerNorm GPT (causal self-attention, GELU MLP) whose every parameter is bf16; the compute
is bf16, the loss fp32. AdamW with a linear warm-up and a cosine decay to a tenth of the peak
rate: the late, small steps are where plain bf16 params (round to nearest) stop learning.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastopt  # noqa: E402
from precision_modes import (  # noqa: E402
    MODES, add_precision_flags, extras_from_flags, mode_flags, plot_losses, state_bytes_per_param,
)


@dataclass
class Config:
    # about 50 ms a step on 2 CPU cores: the four modes of --compare-precision in ~7 minutes
    steps: int = 2000
    batch_size: int = 32
    context: int = 64
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    # 1e-3 (down to 1e-4): small enough that plain bf16 params lose visibly many updates
    # (+2.1% validation loss; at 2e-3 +0.7%), while the other three modes learn alike
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0  # 0: no clipping
    # bf16 params; how the optimizer stores them (precision_modes.py)
    state_dtype: Optional[str] = None  # "bfloat16": bf16 moments, stochastic rounding
    compensation: Optional[str] = None  # "kahan" | "stochastic": instead of master weights
    master_weights: bool = True
    text_bytes: int = 16_000_000  # of torch's sources; the last tenth is the validation text
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    out: str = "runs/char_lm"
    quiet: bool = False


def parse_args(argv: Optional[list[str]] = None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    for name in ("steps", "batch_size", "context", "d_model", "layers", "heads", "warmup", "text_bytes",
                 "eval_every", "eval_batches", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "max_grad_norm"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    add_precision_flags(p, "bf16 params stepped as they are (round to nearest), as torch.optim does")
    p.add_argument("--out", default=d.out)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--compare-precision", action="store_true",
                   help="train with each of the four modes of precision_modes.py; one plot")
    args = vars(p.parse_args(argv))
    compare = args.pop("compare_precision")
    return Config(**args), compare


# ------------------------------------------------------------------------------------------------
# Data: the bytes of torch's own Python sources


def load_text(cfg: Config) -> dict[str, torch.Tensor]:
    parts, size = [], 0
    for f in sorted(pathlib.Path(torch.__file__).parent.rglob("*.py")):
        if size >= cfg.text_bytes:
            break
        parts.append(f.read_bytes())
        size += len(parts[-1]) + 1
    text = b"\n".join(parts)[: cfg.text_bytes]
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = len(data) * 9 // 10
    return {"train": data[:cut], "val": data[cut:]}


def batch(data: torch.Tensor, cfg: Config, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(len(data) - cfg.context - 1, (cfg.batch_size,), generator=gen)
    rows = torch.stack([data[s:s + cfg.context + 1] for s in start.tolist()])
    return rows[:, :-1], rows[:, 1:]


# ------------------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.tok = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.context, cfg.d_model) * 0.02)
        self.blocks = nn.Sequential(*[Block(cfg.d_model, cfg.heads) for _ in range(cfg.layers)])
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2 and name != "pos":
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "out.weight")) else 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW, weight decay on the matrices only; the precision flags as fastopt extras."""
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and n != "pos"]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and n != "pos")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return fastopt.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), max_grad_norm=cfg.max_grad_norm or None,
                         **extras_from_flags(cfg.state_dtype, cfg.compensation, cfg.master_weights))


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then a cosine from lr down to lr / 10 at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class History:
    step_loss: list = field(default_factory=list)
    eval_steps: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    state_bytes_per_param: float = 0.0
    seconds: float = 0.0
    last_step: dict = field(default_factory=dict)  # fastopt's step_stats: kernels or fallback


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, cfg: Config) -> float:
    """The mean loss over the same eval_batches batches of the validation text every time."""
    model.eval()
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = batch(data, cfg, gen)
        losses.append(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def train(cfg: Config) -> History:
    torch.manual_seed(cfg.seed)
    data = load_text(cfg)
    model = CharLM(cfg).to(torch.bfloat16)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)  # the same batches for every mode
    hist = History()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x, y = batch(data["train"], cfg, gen)
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.step_loss.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            hist.eval_steps.append(step + 1)
            hist.val_loss.append(evaluate(model, data["val"], cfg))
            if not cfg.quiet:
                print(f"step {step + 1:5d}  train loss {hist.step_loss[-1]:.4f}  val loss {hist.val_loss[-1]:.4f}",
                      flush=True)
    hist.seconds = time.perf_counter() - t0
    hist.state_bytes_per_param = state_bytes_per_param(opt)
    hist.last_step = {"kernel": opt.step_stats.kernel, "reference": opt.step_stats.reference}
    return hist


def compare_precision(cfg: Config) -> dict[str, History]:
    """The four modes of precision_modes.py from the same seed and batches; one plot."""
    runs = {}
    for mode in MODES:
        if not cfg.quiet:
            print(f"-- {MODES[mode][0]}", flush=True)
        runs[mode] = train(replace(cfg, **mode_flags(mode)))
    return runs


def report(runs: dict[str, History], cfg: Config, path: str) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    try:
        plot_losses({m: (h.eval_steps, h.val_loss) for m, h in runs.items()}, path,
                    "character-level LM on torch's sources, bf16 params", "step")
        print(f"plot: {path}")
    except ImportError:
        print("matplotlib is not installed: no plot")
    base = runs.get("master")
    for mode, h in runs.items():
        rel = f"  {100 * (h.val_loss[-1] / base.val_loss[-1] - 1):+.2f}% vs (a)" if base and mode != "master" else ""
        print(f"{MODES[mode][0]:34s} final val loss {h.val_loss[-1]:.4f}{rel}  "
              f"state {h.state_bytes_per_param:.1f} B/param  {h.seconds:.0f} s")


def main(argv: Optional[list[str]] = None) -> dict[str, History]:
    cfg, compare = parse_args(argv)
    if compare:
        runs = compare_precision(cfg)
        report(runs, cfg, os.path.join(cfg.out, "precision.png"))
        return runs
    hist = train(cfg)
    print(f"final val loss {hist.val_loss[-1]:.4f}  state {hist.state_bytes_per_param:.1f} B/param  "
          f"{hist.seconds:.0f} s")
    return {"run": hist}


if __name__ == "__main__":
    main()
