"""The test matrix as data: each optimizer with torch's OptimizerInfo inputs (and more), shapes,
and per-dtype tolerances."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fastopt


@dataclass
class OptimSpec:
    name: str
    configs: list[dict] = field(default_factory=list)
    lr: float = 1e-2  # a learning rate that moves the params visibly in 20 steps
    # hyperparameters with which it keeps state beyond its defaults (tests that run one config
    # per optimizer use these: SGD keeps no state without momentum)
    stateful: dict = field(default_factory=dict)

    @property
    def torch_cls(self):
        return getattr(torch.optim, self.name)

    @property
    def fastopt_cls(self):
        return getattr(fastopt, self.name)


def _tensor(x: float) -> torch.Tensor:
    return torch.tensor(x)


ADAM_CONFIGS = [
    {},
    {"lr": 0.01},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "maximize": True},
    {"weight_decay": 0.1, "amsgrad": True},
    {"weight_decay": 0.1, "maximize": True, "amsgrad": True},
    {"amsgrad": True},
    {"lr": "tensor"},
    {"betas": "tensor"},
    {"eps": 1e-3, "betas": (0.5, 0.6)},
]

SPECS = [
    OptimSpec("Adam", ADAM_CONFIGS + [
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        {"weight_decay": 0.1, "decoupled_weight_decay": True, "amsgrad": True, "maximize": True},
    ]),
    OptimSpec("AdamW", ADAM_CONFIGS),
    OptimSpec("Adagrad", [
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "maximize": True},
        {"lr": 0.1},
        {"initial_accumulator_value": 0.1, "weight_decay": 0.1},
        {"lr": 0.1, "lr_decay": 0.5, "weight_decay": 0.1},
        {"lr": "tensor"},
        {"eps": 1e-3, "maximize": True},
    ], lr=0.1),
    OptimSpec("RMSprop", [
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "maximize": True},
        {"weight_decay": 0.1, "centered": True},
        {"weight_decay": 0.1, "centered": True, "momentum": 0.1},
        {"weight_decay": 0.1, "centered": True, "momentum": 0.1, "maximize": True},
        {"momentum": 0.9},
        {"alpha": 0.5, "eps": 1e-3},
        {"lr": "tensor", "centered": True, "momentum": 0.5},
    ], lr=1e-3, stateful={"momentum": 0.5}),
    OptimSpec("SGD", [
        {},
        {"weight_decay": 0.1, "maximize": True},
        {"momentum": 0.9},
        {"momentum": 0.9, "dampening": 0.5},
        {"momentum": 0.9, "weight_decay": 0.1},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        {"momentum": 0.9, "nesterov": True, "maximize": True},
        {"lr": "tensor", "momentum": 0.5},
        {"weight_decay": "tensor", "momentum": 0.9},
    ], lr=0.1, stateful={"momentum": 0.9}),
]

SPEC_BY_NAME = {s.name: s for s in SPECS}
NAMES = tuple(SPEC_BY_NAME)


def materialize(spec: OptimSpec, config: dict, dtype: torch.dtype = torch.float32) -> dict:
    """Turn a config's placeholders into values (fresh tensors for each optimizer).

    Tensor betas are made in the params' dtype: torch computes the bias corrections in the betas'
    dtype, fastopt in float64 (Note [tensor betas]), which agree when the betas are float64."""
    out = {"lr": spec.lr, **config}
    if out["lr"] == "tensor":
        out["lr"] = torch.tensor(spec.lr)
    if out.get("weight_decay") == "tensor":  # SGD's weight_decay may be a tensor (read as a number)
        out["weight_decay"] = torch.tensor(0.1)
    if out.get("betas") == "tensor":
        out["betas"] = (torch.tensor(0.9, dtype=dtype), torch.tensor(0.99, dtype=dtype))
    return out


def config_id(config: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in config.items()) or "default"


def spec_cases() -> list:
    import pytest

    return [
        pytest.param(spec, cfg, id=f"{spec.name}-{config_id(cfg)}") for spec in SPECS for cfg in spec.configs
    ]


def make_params(dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Odd shapes: 1, 7, 4097 elements, an empty tensor, a 2-D one and a non-contiguous one."""
    shapes = [(1,), (7,), (4097,), (0,), (3, 5)]
    params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    params.append(torch.randn(6, 8, dtype=dtype, device=device).t())  # non-contiguous
    return [torch.nn.Parameter(p) for p in params]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def random_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    # Non-contiguous grads for the non-contiguous param too (randn_like keeps the strides).
    return [torch.randn_like(p) for p in params]


# Tolerances against torch.optim (same dtype).
# Note [parity tolerances]: fastopt keeps torch's order of operations but computes per-step scalars
# on the device (Note [scalars in float64]) and may fuse differently, so single steps differ by at
# most a few ulps; over 20 steps these compound in the moments. fp64: ulp ~1e-16, so 1e-12
# relative is ~10^4 ulps of headroom yet fails on any real math error (those are >= 1e-4).
# fp32: a few ulps of the state (~1e-7 relative) compounding over 20 steps stays below 1e-5;
# atol covers entries that cancel to ~0.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}


def error_bound(dtype: torch.dtype, torch_error: float, scale: float, roundings: int) -> float:
    """The largest error against a float64 run that fastopt may have in ``dtype`` where
    torch.optim's own error in that dtype is ``torch_error`` and the param's largest magnitude
    ``scale``: twice torch's error (both round the stored state and param per step; fastopt's
    per-step scalars are rounded once from float64, Note [scalars in float64]) plus ``roundings``
    roundings of the param at its scale (eps * scale each), for params where torch's rounding
    happens to land on the float64 value: 4 for float32 params (a few ulps over 20 steps), 1 for
    float16/bfloat16 params computed in float32 (one rounding of the stored param)."""
    return 2 * torch_error + roundings * torch.finfo(dtype).eps * scale
