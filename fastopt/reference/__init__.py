"""The specification: readable pure-PyTorch update rules that every kernel is tested against.

Each rule updates lists of tensors of one device and one dtype in place and runs in float64 as well
as float32. They are not tuned; the ``reference`` backend runs them through the same plan as the
compiled backends.
"""

from .adagrad import adagrad, sparse_adagrad
from .adam import adam
from .batch_norm_relu import batch_norm_relu_backward, batch_norm_relu_forward
from .clip import clip_coefficient, compute_dtype, grad_norm, norm_of_norms, prepare_grads
from .rmsprop import rmsprop
from .sgd import sparse_sgd, sgd

__all__ = [
    "adagrad",
    "adam",
    "batch_norm_relu_backward",
    "batch_norm_relu_forward",
    "clip_coefficient",
    "compute_dtype",
    "grad_norm",
    "norm_of_norms",
    "prepare_grads",
    "rmsprop",
    "sgd",
    "sparse_adagrad",
    "sparse_sgd",
]
