"""Loading of the compiled extension ``fastopt._C`` (it registers ``torch.ops.fastopt.*``).

The package works without it: set ``FASTOPT_NO_EXT=1`` to switch it off, and if it was not built
the ``reference`` backend still runs everything.
"""

from __future__ import annotations

import os
from typing import Optional

import torch  # noqa: F401  (loads libc10 and libtorch before the extension)

_C = None
load_error: Optional[str] = None

if os.environ.get("FASTOPT_NO_EXT", "0") not in ("", "0"):
    load_error = "the compiled extension is switched off (FASTOPT_NO_EXT is set)"
else:
    try:
        from fastopt import _C  # noqa: F811  (registers the ops as a side effect)
    except ImportError as exc:  # not built, or built against another torch
        load_error = f"fastopt._C could not be imported ({exc}); build it with `pip install -e .`"
    if _C is not None:
        # Note [CPU capabilities] (CMakeLists.txt): the CPU kernels' build is chosen now, once; a
        # FASTOPT_CPU_CAPABILITY that this CPU cannot run raises here, at import, with the reason.
        _C.cpu_capability()


def has_cpu_ops() -> bool:
    return _C is not None


def has_cuda_ops() -> bool:
    return _C is not None and bool(_C.built_with_cuda())


def cpu_capability() -> str:
    """The build of the CPU kernels in use: ``"default"`` (the baseline of the architecture:
    x86-64-v2 on x86-64), ``"avx2"`` (x86-64-v3) or ``"avx512"`` (x86-64-v4). The best this CPU
    runs unless ``FASTOPT_CPU_CAPABILITY`` names one (set it before importing fastopt)."""
    if _C is None:
        from .backends import BackendUnavailable

        raise BackendUnavailable(f"no CPU kernels: {load_error}")
    return _C.cpu_capability()


def cpu_capabilities() -> list:
    """The CPU kernels' builds this CPU can run (what FASTOPT_CPU_CAPABILITY may name)."""
    return [] if _C is None else list(_C.cpu_capabilities())
