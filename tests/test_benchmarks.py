"""The benchmark harness: a provider that cannot run is skipped with a note, the run goes on."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from harness import runnable  # noqa: E402


def test_a_provider_refused_at_its_first_step_is_skipped_with_a_note():
    """torch 2.11 accepts Adagrad(fused=True) for CUDA params at construction and refuses it at
    the first step; the first GPU benchmark died there. Here a provider that raises the same way."""
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    good = torch.optim.Adagrad([p]).step

    def refused():
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of\nsupported devices")

    notes: set[str] = set()
    steps = runnable({"torch fused": refused, "torch for-loop": good}, notes)
    assert list(steps) == ["torch for-loop"]
    assert notes == {"torch fused skipped: RuntimeError: `fused=True` requires all the params to be floating "
                     "point Tensors of"}
