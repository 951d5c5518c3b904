"""fastopt: fused optimizer steps for PyTorch, one pass over memory, drop-in for torch.optim."""

from . import _ext, nn, reference
from ._ext import cpu_capabilities, cpu_capability
from .backends import BackendUnavailable, available_backends
from .optim import SGD, Adagrad, Adam, AdamW, RMSprop

__version__ = "0.1.0"

__all__ = [
    "Adagrad",
    "Adam",
    "AdamW",
    "BackendUnavailable",
    "RMSprop",
    "SGD",
    "available_backends",
    "cpu_capabilities",
    "cpu_capability",
    "nn",
    "reference",
]
