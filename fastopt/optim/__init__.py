"""Drop-in replacements for torch.optim's Adam, AdamW, Adagrad and RMSprop."""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .optimizer import FusedOptimizer
from .rmsprop import RMSprop

__all__ = ["Adagrad", "Adam", "AdamW", "FusedOptimizer", "RMSprop"]
