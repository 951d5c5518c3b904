"""Drop-in replacements for torch.optim's Adam, AdamW, Adagrad, RMSprop and SGD."""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .optimizer import FusedOptimizer
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["Adagrad", "Adam", "AdamW", "FusedOptimizer", "RMSprop", "SGD"]
