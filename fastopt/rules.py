"""The update rules, each declared once: its name, its state (the state-dict keys and the compiled
ops' list names, in the ops' order), its hyperparameters (in the ops' order, after lr) and its
specification function. Every backend builds its calls from these (the C++ ops and plans,
csrc/bindings/plans.cpp; the Triton launchers, triton_kernels/; the reference rules,
fastopt/reference/), so a rule's state and hyperparameters are listed here and in its C++ mirror
(Note [a rule in C++], csrc/include/fastopt/update_math.h), nowhere in between;
tests/test_rules.py checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import reference as ref


@dataclass(frozen=True)
class Rule:
    name: str
    # (state key, the ops' list name) per state tensor, in the ops' order; a key a group does not
    # keep (max_exp_avg_sq without amsgrad) is an empty list
    state: tuple[tuple[str, str], ...]
    hyper: tuple[str, ...]  # the hyperparameters after lr, in the ops' order
    spec: Callable  # the reference function: (params, grads, *state lists, [steps,] lr=..., **hyper)
    uses_step: bool = True  # the spec takes the step counts (RMSprop keeps them but does not use them)
    # torch keeps the count in the state ("step"); SGD does not, and its plans count steps of their
    # own (Note [SGD's first step], csrc/include/fastopt/update_math.h)
    keeps_step: bool = True

    @property
    def op_name(self) -> str:
        """The name of the rule's compiled list op, ``torch.ops.fastopt.<name>_`` (the C++ rule's
        kName and its schema, csrc/include/fastopt/update_op.h)."""
        return f"{self.name}_"

    def list_op(self) -> Callable:
        """``torch.ops.fastopt.<name>_`` (needs the compiled extension loaded)."""
        return getattr(torch.ops.fastopt, self.op_name)

    def state_lists(self, states: dict[str, list[Tensor]]) -> list[list[Tensor]]:
        """The state lists of a segment, in the ops' order."""
        return [states.get(key, []) for key, _ in self.state]

    def state_slot(self, key: str) -> int:
        """The index of state ``key`` among the rule's state slots (0 for the first)."""
        return [k for k, _ in self.state].index(key)

    def slots(self, states: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
        """The state lists by the ops' names (what the Triton plans take)."""
        return {name: states.get(key, []) for key, name in self.state}

    def hyper_args(self, hp: dict) -> tuple:
        """The hyperparameters after lr, in the ops' order."""
        return tuple(hp[k] for k in self.hyper)

    def hyper_kwargs(self, hp: dict) -> dict:
        """lr and the hyperparameters, by name (the spec and the Triton launchers take these)."""
        return {"lr": hp["lr"], **{k: hp[k] for k in self.hyper}}

    def run_spec(self, params: list[Tensor], grads: list[Tensor], states: dict, steps: list[Tensor],
                 hp: dict) -> None:
        """One step of the specification on these lists (steps already incremented)."""
        args = [params, grads, *self.state_lists(states)] + ([steps] if self.uses_step else [])
        self.spec(*args, **self.hyper_kwargs(hp))


ADAM = Rule(
    "adam",
    state=(("exp_avg", "exp_avgs"), ("exp_avg_sq", "exp_avg_sqs"), ("max_exp_avg_sq", "max_exp_avg_sqs")),
    hyper=("beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"),
    spec=ref.adam,
)
ADAGRAD = Rule(
    "adagrad",
    state=(("sum", "state_sums"),),
    hyper=("lr_decay", "weight_decay", "eps", "maximize"),
    spec=ref.adagrad,
)
RMSPROP = Rule(
    "rmsprop",
    state=(("square_avg", "square_avgs"), ("grad_avg", "grad_avgs"), ("momentum_buffer", "momentum_buffers")),
    hyper=("alpha", "eps", "weight_decay", "momentum", "centered", "maximize"),
    spec=ref.rmsprop,
    uses_step=False,
)

SGD = Rule(
    "sgd",
    state=(("momentum_buffer", "momentum_buffers"),),
    hyper=("momentum", "dampening", "weight_decay", "nesterov", "maximize"),
    spec=ref.sgd,
    keeps_step=False,
)

RULES = (ADAM, ADAGRAD, RMSPROP, SGD)
