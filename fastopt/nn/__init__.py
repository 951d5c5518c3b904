"""Fused BatchNorm+ReLU: drop-in modules, the functional form and a model converter."""

from . import functional
from .fuse import fuse_bn_relu
from .modules import BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "functional", "fuse_bn_relu"]
