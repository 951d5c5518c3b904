"""Loading a state dict into a fastopt optimizer (FusedOptimizer.load_state_dict): the whole dict is
validated before torch's loading replaces anything (DESIGN.md, Safety: ``load_state_dict``
validates the whole dict first), and the loaded state is then settled where fastopt keeps it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def validate(opt: Any, state_dict: dict) -> dict:
    """Refuse another optimizer's state dict (a group key its rule reads is missing, a state key it
    does not keep) and state tensors whose shape is not their param's. Returns {saved id: param}
    when the groups and their params correspond (else torch's loading raises its own error)."""
    groups, saved_groups = opt.param_groups, state_dict["param_groups"]
    name = type(opt).__name__
    for i, saved in enumerate(saved_groups):
        for key in opt._group_keys:
            if key not in saved:
                raise KeyError(f"{key!r}: param group {i} of the loaded state dict has no {key!r}, which "
                               f"{name} needs (is it another optimizer's state dict?)")
    allowed = set(opt._state_names) | {"step", "master_param", "seed", "compensation"}
    for saved_id, saved_state in state_dict["state"].items():
        extra = sorted(set(saved_state) - allowed)
        if extra:
            raise ValueError(f"loaded state dict does not belong to {name}: the state of parameter "
                             f"{saved_id} has {extra}, {name} keeps {sorted(allowed)}")
    if len(groups) != len(saved_groups) or any(len(g["params"]) != len(s["params"])
                                                 for g, s in zip(groups, saved_groups)):
        return {}
    id_map = {saved_id: p for g, s in zip(groups, saved_groups) for saved_id, p in zip(s["params"], g["params"])}
    for saved_id, saved_state in state_dict["state"].items():
        p = id_map.get(saved_id)
        if p is None:
            continue
        for key, value in saved_state.items():
            if key not in ("step", "seed") and isinstance(value, Tensor) and value.shape != p.shape:
                raise ValueError(
                    f"loaded state dict does not match this optimizer's parameters: state {key!r} of "
                    f"parameter {saved_id} has shape {tuple(value.shape)}, the parameter has shape "
                    f"{tuple(p.shape)}")
    return id_map


def settle(opt: Any, state_dict: dict, id_map: dict) -> None:
    """After torch's loading: ``step`` as a float32 tensor on the param's device (no host sync in
    step()); with master weights, the moments and ``master_param`` of fp16/bf16 params in float32
    (torch's loading casts them to the param's dtype), else no ``master_param``."""
    for saved_id, p in id_map.items():
        state = opt.state.get(p)
        if not state:
            continue
        if "step" in state:  # (SGD keeps none, as in torch)
            state["step"] = torch.as_tensor(state["step"]).to(dtype=torch.float32, device=p.device)
        saved = state_dict["state"].get(saved_id, {})
        if opt._uses_master(p):
            for key, value in saved.items():
                if key not in ("step", "seed") and isinstance(value, Tensor):
                    state[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
        else:
            state.pop("master_param", None)
        _settle_low_precision(opt, p, state, saved)


def _settle_low_precision(opt: Any, p: Tensor, state: dict, saved: dict) -> None:
    """With ``state_dtype``: the state tensors in bfloat16 (rounded to nearest from what was saved,
    a torch.optim dict's float32 moments say). With a stochastic store (``state_dtype`` or
    compensation="stochastic"): the saved seed as it was (torch's loading casts it to the param's
    dtype); a dict without one gets a fresh seed at the next step. Without: no seed. A saved
    compensation buffer stays with compensation="kahan" (in the param's dtype; a dict without one
    starts from zeros) and is dropped otherwise, as ``master_param`` is."""
    if not opt._keeps_step(p):  # SGD without a stochastic store: its plans count (Note [SGD's first step])
        state.pop("step", None)
    if opt._compensation(p) != "kahan":
        state.pop("compensation", None)
    elif isinstance(saved.get("compensation"), Tensor):
        state["compensation"] = saved["compensation"].to(device=p.device, dtype=p.dtype, copy=True)
    if not opt._needs_seed(p):
        state.pop("seed", None)
        return
    if opt._options.state_dtype is None:
        _keep_seed(state, saved)
        return
    for key in opt._state_names:
        value = saved.get(key)
        if isinstance(value, Tensor):
            state[key] = value.to(device=p.device, dtype=opt._options.state_dtype, copy=True)
    _keep_seed(state, saved)


def _keep_seed(state: dict, saved: dict) -> None:
    seed = saved.get("seed")
    if seed is None:
        state.pop("seed", None)
    else:
        state["seed"] = torch.as_tensor(seed).to(device="cpu", dtype=torch.int64, copy=True)
