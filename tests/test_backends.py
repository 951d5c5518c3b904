"""Backend availability and dispatch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastopt
from fastopt import _ext, backends


def test_reference_is_always_available():
    assert "reference" in fastopt.available_backends("cpu")
    assert "reference" in fastopt.available_backends("cuda")


def test_auto_resolution_on_cpu():
    expected = "cpu" if _ext.has_cpu_ops() else "reference"
    assert backends.resolve("auto", "cpu").name == expected


@pytest.mark.skipif(os.environ.get("FASTOPT_REQUIRE_EXT") != "1", reason="only where the build is required")
def test_extension_was_built():
    assert _ext.has_cpu_ops(), _ext.load_error
    assert "cpu" in fastopt.available_backends("cpu")


def test_backend_in_use_is_the_requested_one(backend, device):
    p = torch.nn.Parameter(torch.randn(4, device=device))
    opt = fastopt.Adam([p], backend=backend)
    p.grad = torch.ones_like(p)
    opt.step()
    assert [b.backend.name for b in opt._run.plan.buckets] == [backend]


def test_package_works_without_the_extension():
    code = (
        "import torch, fastopt; b = fastopt.available_backends('cpu'); "
        "assert 'cpu' not in b and 'reference' in b, b; p = torch.nn.Parameter(torch.ones(3)); "
        "o = fastopt.Adam([p], max_grad_norm=1.0); p.grad = torch.ones(3); o.step(); "
        "assert (p < 1).all()"
    )
    env = {**os.environ, "FASTOPT_NO_EXT": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
