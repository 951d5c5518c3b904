"""The four ways the examples train bf16 params, side by side (issue 27's convergence check).

    (a) master      fp32 master weights and fp32 moments (14 B of state per param, 28 B moved a step)
    (b) kahan       no masters: bf16 moments (stochastic rounding) and a bf16 Kahan compensation
                    buffer per param (6 B of state, 18 B moved)
    (c) stochastic  no masters: bf16 moments, the bf16 params themselves rounded stochastically
                    (4 B of state, 14 B moved)
    (d) nearest     no masters, no compensation: bf16 params and moments rounded to nearest, as a
                    plain torch.optim step on bf16 params does; updates smaller than half a bf16
                    ulp of the param are lost, which is the failure the other three avoid

Both examples (``train_resnet.py --compare-precision``, ``train_char_lm.py --compare-precision``)
run the four from the same seed and data order, and plot their validation losses with
``plot_losses``.
"""

from __future__ import annotations

from typing import Optional

import torch

# name -> (label, fastopt extras)
MODES: dict[str, tuple[str, dict]] = {
    "master": ("(a) fp32 master weights", {"master_weights": True}),
    "kahan": ("(b) bf16 state + Kahan", {"state_dtype": torch.bfloat16, "compensation": "kahan"}),
    "stochastic": ("(c) bf16 state + stochastic", {"state_dtype": torch.bfloat16, "compensation": "stochastic"}),
    "nearest": ("(d) plain bf16, round to nearest", {}),
}


def add_precision_flags(parser, master_help: str) -> None:
    """The examples' --state-dtype, --compensation and --no-master-weights (Config.state_dtype,
    .compensation, .master_weights)."""
    parser.add_argument("--state-dtype", choices=["float32", "bfloat16"], default=None,
                        help="fastopt's optimizer state dtype (bfloat16: stochastic rounding)")
    parser.add_argument("--compensation", choices=["kahan", "stochastic"], default=None,
                        help="bf16 params without master weights: a Kahan buffer, or stochastic rounding")
    parser.add_argument("--no-master-weights", dest="master_weights", action="store_false", help=master_help)


def extras_from_flags(state_dtype: Optional[str], compensation: Optional[str], master_weights: bool) -> dict:
    """The optimizer extras of the examples' --state-dtype, --compensation and master-weight flags.
    A compensation stands in for the master weights (fastopt refuses both at once)."""
    extras: dict = {"master_weights": master_weights and compensation is None}
    if state_dtype not in (None, "float32"):
        extras["state_dtype"] = getattr(torch, state_dtype)
    if compensation is not None:
        extras["compensation"] = compensation
    return extras


def mode_flags(mode: str) -> dict:
    """The examples' Config fields (state_dtype, compensation, master_weights) of one of MODES."""
    extras = MODES[mode][1]
    dtype = extras.get("state_dtype")
    return {"state_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "compensation": extras.get("compensation"), "master_weights": extras.get("master_weights", False)}


def state_bytes_per_param(opt: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state per param element, from the state tensors themselves (the
    step count and seed, one element per param, counted too)."""
    params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return state / max(params, 1)


def plot_losses(curves: dict[str, tuple[list, list]], path: str, title: str, xlabel: str) -> None:
    """One line per mode: ``curves[mode] = (x, validation losses)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, (x, y) in curves.items():
        ax.plot(x, y, label=MODES[mode][0])
    ax.set(xlabel=xlabel, ylabel="validation cross-entropy", yscale="log", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
