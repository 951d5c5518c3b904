"""The Triton kernels compile with the real Triton compiler for Ampere and Hopper (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is not installed")


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_aot.py")
    result = subprocess.run([sys.executable, script, str(arch)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"for sm_{arch}" in result.stdout
