"""Shared fixtures: seeded RNG, the backend axis and a verbose allclose."""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import zlib
from typing import Optional

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be switched
# on before Triton is first imported (fastopt imports it lazily, on the first triton step).
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastopt  # noqa: E402
from fastopt import backends  # noqa: E402

# `make asan`: every test process (isolated children too) must run the instrumented build
if os.environ.get("FASTOPT_EXPECT_ASAN") == "1":
    assert fastopt._ext._C is not None and "asan" in fastopt._ext._C.__file__, \
        f"not the ASan build of fastopt._C: {fastopt._ext._C and fastopt._ext._C.__file__}"


def backend_device(name: str) -> str:
    """The device a backend's tests run on: CUDA where there is one, else the CPU."""
    if name == "cuda":
        return "cuda"
    if name == "triton":
        return "cuda" if HAS_CUDA else "cpu"
    return "cpu"


def backend_params(device: Optional[str] = None) -> list:
    """The backend axis (every backend but "auto"), with a skip (and its reason) for each backend
    that cannot run here: on its own device (backend_device), or on ``device`` when given (the
    distributed tests' gloo ranks run on CPU tensors)."""
    out = []
    for name in backends.NAMES[1:]:
        reason = backends.why_unavailable(name, device or backend_device(name))
        if name == "triton" and device is None and not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
            reason = reason or "no GPU and TRITON_INTERPRET is not set"
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        if name == "cuda":
            marks.append(pytest.mark.cuda)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(params=backend_params())
def backend(request) -> str:
    return request.param


def skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    """Skip (with the reason) a case whose param dtype the backend does not update."""
    if dtype.is_complex:
        dtype = torch.float32 if dtype == torch.complex64 else torch.float64
    if not backends.resolve(backend, backend_device(backend)).supports(dtype):
        pytest.skip(f"{backend}: no {dtype} params (they run on another backend)")


@pytest.fixture
def device(backend) -> str:
    return backend_device(backend)


_CONFIG = {}


def pytest_configure(config):
    _CONFIG["rootdir"] = str(config.rootpath)
    _CONFIG["inifile"] = str(config.inipath) if config.inipath else None


def _keeps_triton_case(matrix: str, nodeid: str, first: bool) -> bool:
    """Whether FASTOPT_TRITON_MATRIX keeps a triton case (one that runs in Triton's interpreter):
    "sample" keeps the first collected case of each test function; "half" that one and about half
    of the others, chosen by a hash of the case's id (not by position, so that a test function whose
    cases alternate dtypes or rules still runs some of each); anything else keeps all."""
    if matrix == "sample":
        return first
    if matrix == "half":
        return first or zlib.crc32(nodeid.encode()) % 2 == 0
    return True


def pytest_collection_modifyitems(config, items):
    """FASTOPT_TRITON_MATRIX on a machine without a GPU (_keeps_triton_case): the triton cases run
    in Triton's interpreter, three quarters of the suite's time there. `make test` and CI's second
    environment (the GPU machine's Triton) set "sample", which keeps CI within its hour on the
    slower of this workplace's CPUs ("half" did not); on a GPU every case runs. Dropped cases are
    deselected (and counted as such)."""
    matrix = os.environ.get("FASTOPT_TRITON_MATRIX", "full")
    if HAS_CUDA or matrix not in ("sample", "half"):
        return
    kept, dropped, seen = [], [], set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("backend") != "triton":
            kept.append(item)
            continue
        key = (item.nodeid.split("::")[0], item.originalname)
        (kept if _keeps_triton_case(matrix, item.nodeid, key not in seen) else dropped).append(item)
        seen.add(key)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def isolated(test):
    """Runs the test in a child pytest process, for error paths that throw through compiled code:
    if the process dies (a segfault, an abort), this one test fails with the signal's name and the
    run goes on (the first GPU run lost its whole test run to one such crash)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if os.environ.get("FASTOPT_TEST_CHILD") == "1":
            return test(*args, **kwargs)
        nodeid = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        # the child runs where this process runs, so that it imports the same fastopt (the
        # installed one in CI's second environment, the ASan build under `make asan`), with the
        # test named by its absolute path
        path = os.path.join(_CONFIG["rootdir"], nodeid)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", path,
               "--rootdir", _CONFIG["rootdir"]]
        if _CONFIG.get("inifile"):
            cmd += ["-c", _CONFIG["inifile"]]
        result = subprocess.run(cmd, cwd=os.getcwd(), env={**os.environ, "FASTOPT_TEST_CHILD": "1"},
                                capture_output=True, text=True, timeout=600)
        if result.returncode < 0:
            pytest.fail(f"the test's process died with {signal.Signals(-result.returncode).name}:\n"
                        f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        assert result.returncode == 0, f"{result.stdout[-3000:]}{result.stderr[-2000:]}"

    return wrapper


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def assert_close(actual, expected, *, rtol: float, atol: float, what: str = "") -> None:
    """torch.testing-style closeness, with a message that lists the count and first indices of
    mismatches and any NaN/inf disagreement."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_complex():
        a, e = torch.view_as_real(a), torch.view_as_real(e)
    a64, e64 = a.double(), e.double()
    finite = torch.isfinite(e64)
    nonfinite_mismatch = (~finite) & ~((a64 == e64) | (torch.isnan(a64) & torch.isnan(e64)))
    bad = (finite & ~((a64 - e64).abs() <= atol + rtol * e64.abs())) | nonfinite_mismatch
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        err = (a64 - e64).abs()[finite].max().item() if finite.any() else float("nan")
        pytest.fail(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
            f"max abs err {err:.3g}; first at {idx}: actual {[a64[tuple(i)].item() for i in idx]} "
            f"expected {[e64[tuple(i)].item() for i in idx]}"
        )
