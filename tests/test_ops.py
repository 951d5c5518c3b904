"""The compiled ops of fastopt._C against the reference (skipped when the extension is absent)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import isolated
from fastopt import _ext
from fastopt import reference as ref

pytestmark = pytest.mark.skipif(not _ext.has_cpu_ops(), reason=f"fastopt._C: {_ext.load_error}")

SIZES = [[1], [7, 4097, 0], [65537, 3], [0]]
# Note [norm tolerances]: the op unscales, clamps and accumulates in float64, so it is compared
# with the reference run on float64 copies of the grads: they differ only in summation order
# (~1e-15) and in the final rounding to float32 (half an ulp, 6e-8): 2.5e-7 is 4 ulps of float32.
NORM_TOL = {torch.float32: 2.5e-7, torch.float64: 1e-12, torch.bfloat16: 2.5e-7, torch.float16: 2.5e-7}


@pytest.mark.parametrize("dtype", list(NORM_TOL), ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("inv_scale,clip_value", [(None, None), (0.25, None), (None, 0.5), (0.5, 0.3)])
def test_multi_tensor_norm_matches_reference(dtype, norm_type, sizes, inv_scale, clip_value):
    grads = [torch.randn(n, dtype=dtype) * 3 for n in sizes]
    inv = None if inv_scale is None else torch.tensor(inv_scale)
    got = torch.ops.fastopt.multi_tensor_norm(grads, norm_type, inv, clip_value)
    grads64 = [g.double() for g in grads]
    expected = ref.grad_norm(ref.prepare_grads(grads64, inv_scale=inv, clip_value=clip_value), norm_type)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=NORM_TOL[dtype], atol=0)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_multi_tensor_norm_propagates_nonfinite(norm_type):
    g = [torch.randn(100), torch.randn(50)]
    g[1][3] = float("inf")
    assert torch.ops.fastopt.multi_tensor_norm(g, norm_type, None, None).item() == math.inf
    g[0][7] = float("nan")
    assert math.isnan(torch.ops.fastopt.multi_tensor_norm(g, norm_type, None, None).item())


@isolated
def test_multi_tensor_norm_rejects_bad_input():
    with pytest.raises(RuntimeError, match="norm_type must be 2.0 or inf"):
        torch.ops.fastopt.multi_tensor_norm([torch.randn(3)], 1.0, None, None)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.fastopt.multi_tensor_norm([torch.randn(3), torch.randn(3).double()], 2.0, None, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fastopt.multi_tensor_norm([torch.randn(4, 4).t()], 2.0, None, None)


def test_multi_tensor_norm_has_a_meta_kernel():
    out = torch.ops.fastopt.multi_tensor_norm([torch.empty(5, device="meta")], 2.0, None, None)
    assert out.device.type == "meta" and out.shape == () and out.dtype == torch.float32


def _adam_lists(dtypes):
    """One list per slot of adam_ (params, grads, exp_avgs, exp_avg_sqs), tensor i of dtype dtypes[slot][i]."""
    return [[torch.randn(8, dtype=d) for d in slot] for slot in dtypes]


@pytest.mark.parametrize("case", ["a grad of another dtype, not the first",
                                  "state of another dtype than the params",
                                  "a param of another dtype, not the first"])
@isolated
def test_adam_op_checks_every_tensor_not_the_first(case):
    """The registered ops are public: a list whose later tensors (or whole state slots) have another
    dtype than the kernel would read them as is refused, not read out of bounds."""
    f, b = torch.float32, torch.bfloat16
    dtypes = {
        "a grad of another dtype, not the first": [[f, f], [f, b], [f, f], [f, f]],
        "state of another dtype than the params": [[b, b], [b, b], [f, f], [f, f]],
        "a param of another dtype, not the first": [[f, b], [f, f], [f, f], [f, f]],
    }[case]
    params, grads, m, v = _adam_lists(dtypes)
    steps = [torch.zeros(()) for _ in params]
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match="dtype|is BFloat16|is Float|are"):
        torch.ops.fastopt.adam_(params, grads, m, v, [], steps, [], torch.tensor(0.1, dtype=torch.float64),
                                0.9, 0.999, 1e-8, 0.0, False, False, False, None, None, None, None)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(float(s) == 0.0 for s in steps)
