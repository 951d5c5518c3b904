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


def has_cpu_ops() -> bool:
    return _C is not None


def has_cuda_ops() -> bool:
    return _C is not None and bool(_C.built_with_cuda())
