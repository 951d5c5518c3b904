"""Deterministic stochastic rounding to bfloat16 (Note [deterministic stochastic rounding],
csrc/include/fastopt/stochastic_round.h): the C++ rounding and the specification give the same
bits, the result is always one of the two bfloat16 neighbours, it is unbiased, and it depends on
(seed, step, index) only, not on how a tensor is cut into pieces."""

from __future__ import annotations

import pytest
import torch

import fastopt
from fastopt.reference.rounding import stochastic_bits, stochastic_round_bf16

needs_ext = pytest.mark.skipif(fastopt._ext._C is None, reason="needs the compiled extension")


def _values() -> torch.Tensor:
    torch.manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"),
                            3.3895313892515355e38, -3.3895313892515355e38,  # near bf16's largest finite
                            torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny, 1e-40, -1e-40])
    return torch.cat([special, torch.randn(5000), torch.randn(3000) * 1e-30, torch.randn(2000) * 1e30])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


@needs_ext
@pytest.mark.parametrize("seed,step,offset", [(0, 1, 0), (12345, 7, 3), (2**40 + 17, 2**20, 2**33)])
def test_cpu_rounding_is_the_specification(seed, step, offset):
    x = _values()
    ours = fastopt._ext._C.stochastic_round_bf16(x, seed, step, offset)
    spec = stochastic_round_bf16(x, seed, step, offset)
    assert torch.equal(_bits(ours), _bits(spec))


def test_rounds_to_a_neighbour_and_keeps_specials():
    x = _values()
    got = _bits(stochastic_round_bf16(x, 3, 1)).to(torch.int64)
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    down = u >> 16
    finite = (u & 0x7FFFFFFF) <= 0x7F800000
    assert bool(((got == down) | (got == down + 1))[finite].all())
    assert bool((got[u & 0xFFFF == 0] == down[u & 0xFFFF == 0]).all())  # representable: unchanged
    nan = ~finite
    assert bool(torch.isnan(stochastic_round_bf16(x, 3, 1)[nan]).all())
    assert torch.equal(stochastic_round_bf16(x[4:6], 3, 1, 4).float(), x[4:6])  # +-inf


def test_unbiased():
    """Rounded 2^16 times (one index each), 1 + 2^-9 (a quarter of bf16's ulp 2^-7 above 1)
    averages to itself: the count of round-ups has mean 2^14 and standard deviation ~111; 5 sigma
    allowed (deterministic: fixed seed and step)."""
    n = 1 << 16
    x = torch.full((n,), 1.0 + 2.0**-9)
    ups = int((stochastic_round_bf16(x, 99, 5).float() > 1.0).sum())
    assert abs(ups - n / 4) < 5 * (n * 0.25 * 0.75) ** 0.5, ups


def test_depends_on_seed_step_and_index_only():
    x = torch.randn(10_000)
    whole = _bits(stochastic_round_bf16(x, 42, 3))
    pieces = torch.cat([_bits(stochastic_round_bf16(x[a:b], 42, 3, a)) for a, b in ((0, 17), (17, 4096), (4096, 10_000))])
    assert torch.equal(whole, pieces)
    assert not torch.equal(whole, _bits(stochastic_round_bf16(x, 42, 4)))  # another step
    assert not torch.equal(whole, _bits(stochastic_round_bf16(x, 43, 3)))  # another seed
    r = stochastic_bits(42, 3, torch.arange(1 << 16))
    assert 0 <= int(r.min()) and int(r.max()) < 2**32
    assert abs(float((r & 0xFFFF).double().mean()) / 65535 - 0.5) < 0.01  # the low half is uniform
