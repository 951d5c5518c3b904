"""Triton kernels of fastopt, installed as ``fastopt.triton_kernels``.

One launch updates every tensor of a param group (``multi_tensor.py`` builds the chunk and pointer
tables once per plan); one more launch computes the global gradient norm and the clip coefficient
when clipping is on (``norm.py``). Per-element math follows ``csrc/include/fastopt/update_math.h``
(Triton has its own copy; the same tests check both).

Importing this package needs Triton; ``fastopt.backends.triton`` imports it lazily and reports
the backend unavailable, with the reason, when it cannot.
"""

from .adagrad import adagrad_step
from .batch_norm_relu import bn_relu_backward, bn_relu_forward
from .adam import adam_step
from .multi_tensor import MultiTensorPlan
from .norm import grad_norm
from .rmsprop import rmsprop_step
from .sgd import sgd_step

# the step launcher of each rule, by the rule's name (fastopt/rules.py)
STEPS = {"adam": adam_step, "adagrad": adagrad_step, "rmsprop": rmsprop_step, "sgd": sgd_step}

__all__ = [
    "MultiTensorPlan",
    "STEPS",
    "adagrad_step",
    "adam_step",
    "bn_relu_backward",
    "bn_relu_forward",
    "grad_norm",
    "rmsprop_step",
    "sgd_step",
]
