"""``BatchNormReLU1d/2d/3d``: ``BatchNormNd`` followed by ``ReLU``, as one module.

They are ``torch.nn.modules.batchnorm._BatchNorm`` subclasses with exactly BatchNorm's parameters,
buffers and state-dict keys, so checkpoints move both ways and code that finds norm layers with
``isinstance(m, _BatchNorm)`` (freezing them, excluding them from weight decay) still does.
"""

from __future__ import annotations

import inspect
import sys
import weakref

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .. import backends as _backends
from .functional import batch_norm_relu, verify_batch_size

# Note [a shared ReLU after a fused BatchNorm]: torchvision's ResNet blocks call one ``self.relu``
# after a BatchNorm and after the residual add, so ``fuse_bn_relu`` cannot drop that module, and its
# call after the fused BatchNorm would read and write the activation again forward and backward
# (as many accesses as the fusion saves). Such a ReLU becomes ``SharedReLU``, which returns its
# input unchanged when that input is the output of a fused module that feeds it (``marks_output``:
# the output is recorded here, by identity, until it is freed). ReLU is idempotent, the fused
# output is already max(z, 0) (NaN kept, as torch's relu keeps it), and the fused module's output
# has no other reader (the trace checked that), so returning it is what relu would have computed.
# Under torch.compile neither side does this (plain relu; inductor fuses it).
_FUSED_OUTPUTS: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


def is_fused_output(t: Tensor) -> bool:
    """Whether ``t`` is the output of a fused module with ``marks_output`` set, still alive."""
    return _FUSED_OUTPUTS.get(id(t)) is t


# Note [SyncBatchNorm conversion]: torch.nn.SyncBatchNorm.convert_sync_batchnorm replaces every
# _BatchNorm instance by a plain SyncBatchNorm, which would silently drop our ReLU. It offers no
# hook, so the fused modules refuse it: the first thing it reads from a module is `num_features`,
# and that property raises when its caller is convert_sync_batchnorm. (Modules it already visited
# earlier in the same call may have been converted; parameters are never touched.)
_CONVERT_SYNC = torch.nn.SyncBatchNorm.convert_sync_batchnorm.__func__.__code__

# BatchNorm's keyword-only `bias` (affine with a weight and no bias) is newer than some torch
# versions fastopt supports; it is passed on only where torch has it.
_HAS_BIAS_ARG = "bias" in inspect.signature(_BatchNorm.__init__).parameters


class _BatchNormReLU(_BatchNorm):
    # Note [a shared ReLU after a fused BatchNorm]; also a class default, for modules pickled before it
    marks_output = False
    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 backend: str = "auto"):
        if backend not in _backends.NAMES:
            raise ValueError(f"{type(self).__name__}: unknown backend {backend!r}; expected one of "
                             f"{_backends.NAMES}")
        extra = {}
        if not bias:
            if not _HAS_BIAS_ARG:
                raise TypeError(f"{type(self).__name__}: bias=False needs a torch whose BatchNorm has "
                                f"the bias argument (this is torch {torch.__version__})")
            extra["bias"] = False
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **extra)
        self.backend = backend
        self.marks_output = False  # Note [a shared ReLU after a fused BatchNorm]

    @property
    def num_features(self) -> int:
        if sys._getframe(1).f_code is _CONVERT_SYNC:
            raise RuntimeError(
                f"torch.nn.SyncBatchNorm.convert_sync_batchnorm would replace fastopt.nn.{type(self).__name__} "
                "by a plain SyncBatchNorm and drop its ReLU. Convert to SyncBatchNorm first and fuse "
                "afterwards: fastopt.nn.fuse_bn_relu leaves SyncBatchNorm modules as they are. (Modules "
                "visited before this one may already have been converted.)")
        return self.__dict__["num_features"]

    @num_features.setter
    def num_features(self, value: int) -> None:
        self.__dict__["num_features"] = value  # where _NormBase.extra_repr reads it

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, *, backend: str = "auto") -> "_BatchNormReLU":
        """A fused module sharing ``bn``'s parameters and buffers (an optimizer holding them keeps
        working) and its mode."""
        fused = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta",
                    bias=not bn.affine or bn.bias is not None, backend=backend)
        for name, param in bn.named_parameters(recurse=False):
            setattr(fused, name, param)
        for name, buf in bn.named_buffers(recurse=False):
            setattr(fused, name, buf)
        fused.train(bn.training)
        return fused

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        channels = self.__dict__["num_features"]
        if input.shape[1] != channels:
            raise ValueError(f"{type(self).__name__}({channels}): the input has {input.shape[1]} channels "
                             f"(dim 1 of shape {tuple(input.shape)}), expected {channels}")
        # The rest is _BatchNorm.forward, with one change: the input is validated before
        # num_batches_tracked moves, so a bad batch leaves the module as it was.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if self.training:
            verify_batch_size(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_running = not self.training or self.track_running_stats
        out = batch_norm_relu(input, self.running_mean if use_running else None,
                              self.running_var if use_running else None, self.weight, self.bias,
                              bn_training, factor, self.eps, backend=self.backend)
        if self.marks_output and not torch.compiler.is_compiling():
            _FUSED_OUTPUTS[id(out)] = out
        return out

    def extra_repr(self) -> str:
        tail = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return super().extra_repr() + tail


class BatchNormReLU1d(_BatchNormReLU):
    """``BatchNorm1d`` followed by ``ReLU`` (inputs (N, C) or (N, C, L)); same arguments, plus
    ``backend`` ("auto", "reference", "cpu", "triton" or "cuda")."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNormReLU2d(_BatchNormReLU):
    """``BatchNorm2d`` followed by ``ReLU`` (inputs (N, C, H, W), contiguous or channels_last); same
    arguments, plus ``backend``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNormReLU3d(_BatchNormReLU):
    """``BatchNorm3d`` followed by ``ReLU`` (inputs (N, C, D, H, W)); same arguments, plus ``backend``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d"]
