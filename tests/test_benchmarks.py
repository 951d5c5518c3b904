"""The benchmark harness: a provider that cannot run is skipped with a note, the run goes on."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch


def _bench_harness():
    """benchmarks/harness.py (tests/ has a harness.py of its own)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "harness.py")
    spec = importlib.util.spec_from_file_location("bench_harness", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


runnable = _bench_harness().runnable


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
