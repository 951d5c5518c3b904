"""Backend registry and ``backend="auto"`` resolution (see DESIGN.md, Layers)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .cpu import CpuBackend
from .cuda import CudaBackend
from .base import Backend, GradTransform
from .reference import ReferenceBackend
from .triton import TritonBackend

NAMES = ("auto", "reference", "cpu", "triton", "cuda")

# Preference order of backend="auto", per device type.
_AUTO = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_BACKENDS = {b.name: b for b in (ReferenceBackend(), CpuBackend(), TritonBackend(), CudaBackend())}


class BackendUnavailable(RuntimeError):
    """Raised when a named backend cannot run on the requested device."""


def _device_type(device: Union[str, torch.device]) -> str:
    return torch.device(device).type


def why_unavailable(name: str, device: Union[str, torch.device]) -> Union[str, None]:
    """None when ``name`` can run on ``device``, else the reason it cannot."""
    if name not in NAMES or name == "auto":
        return f"unknown backend {name!r}; expected one of {NAMES}"
    return _BACKENDS[name].unavailable_reason(_device_type(device))


def available_backends(device: Union[str, torch.device]) -> list[str]:
    """The backend names usable for tensors on ``device`` (``"cpu"`` or ``"cuda"``)."""
    return [n for n in NAMES[1:] if why_unavailable(n, device) is None]


def resolve(name: str, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None):
    """The backend object for ``name`` on ``device`` (and, when given, params stored in ``dtype``);
    ``"auto"`` picks the fastest available one that supports ``dtype``."""
    device_type = _device_type(device)
    if name == "auto":
        for candidate in _AUTO.get(device_type, ("reference",)):
            if why_unavailable(candidate, device) is None and (dtype is None or _BACKENDS[candidate].supports(dtype)):
                return _BACKENDS[candidate]
    reason = why_unavailable(name, device)
    if reason is None and dtype is not None and not _BACKENDS[name].supports(dtype):
        reason = f"it does not support {dtype} params (backend='reference' does)"
    if reason is not None:
        raise BackendUnavailable(f"backend={name!r} cannot run on {device_type} tensors: {reason}")
    return _BACKENDS[name]


__all__ = ["Backend", "BackendUnavailable", "GradTransform", "available_backends", "resolve", "why_unavailable"]
