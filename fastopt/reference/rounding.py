"""Deterministic stochastic rounding of float32 to bfloat16, the specification
(csrc/include/fastopt/stochastic_round.h, Note [deterministic stochastic rounding]): the same
arithmetic on int64 tensors, so that it runs on any device torch supports and equals the C++
kernels bit for bit. Every product is formed from 16-bit halves so that nothing exceeds int64."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._plan import dense

_M32 = 0xFFFFFFFF
SEED_LO, SEED_HI, STEP, INDEX_LO, INDEX_HI = 0xC2B2AE3D, 0x27D4EB2F, 0x85EBCA77, 0x9E3779B1, 0x165667B1
MIX1, MIX2 = 0x7FEB352D, 0x846CA68B

Int = Union[int, Tensor]


def _mul32(a: Tensor, b: int) -> Tensor:
    """(a * b) mod 2^32 for int64 ``a`` in [0, 2^32) and a 32-bit constant ``b``."""
    return (a * (b & 0xFFFF) + ((a * (b >> 16)) & 0xFFFF) * 0x10000) & _M32


def _words(v: Int, device: torch.device) -> tuple[Tensor, Tensor]:
    v = torch.as_tensor(v, dtype=torch.int64, device=device)
    return v & _M32, (v >> 32) & _M32


def stochastic_bits(seed: Int, step: Int, index: Tensor) -> Tensor:
    """32 random bits (int64 in [0, 2^32)) per element of ``index`` (int64, >= 0)."""
    seed_lo, seed_hi = _words(seed, index.device)
    step_lo, _ = _words(step, index.device)
    h = (_mul32(seed_lo, SEED_LO) + _mul32(seed_hi, SEED_HI) + _mul32(step_lo, STEP)
         + _mul32(index & _M32, INDEX_LO) + _mul32((index >> 32) & _M32, INDEX_HI)) & _M32
    h = h ^ (h >> 16)
    h = _mul32(h, MIX1)
    h = h ^ (h >> 15)
    h = _mul32(h, MIX2)
    return h ^ (h >> 16)


@torch.no_grad()
def stochastic_round_bf16(x: Tensor, seed: Int, step: Int, offset: int = 0,
                          index: Optional[Tensor] = None, half: int = 0) -> Tensor:
    """``x`` (float32) rounded to bfloat16 stochastically; element ``i`` of ``x`` (in its flat,
    row-major order) takes the random bits of index ``offset + i``, or of ``index`` (an int64
    tensor of ``x``'s shape: ``memory_index``) when given: their low 16 bits (``half=0``) or their
    high 16 (``half=1``)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16: expected float32, got {x.dtype}")
    flat = x.contiguous().view(-1)
    u = flat.view(torch.int32).to(torch.int64) & _M32
    if index is None:
        index = torch.arange(offset, offset + flat.numel(), device=x.device)
    r = stochastic_bits(seed, step, index.reshape(-1)) >> (16 * half)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    bits = torch.where(nan, (u >> 16) | 0x40, (u + (r & 0xFFFF)) >> 16)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)  # two's complement
    return bits.view(torch.bfloat16).view(x.shape)


def memory_index(t: Tensor) -> Tensor:
    """Each element's index as the kernels count it (Note [stochastic state], update_math.h): its
    position in ``t``'s memory when ``t`` is non-overlapping and dense (a transposed or
    channels_last tensor walks its memory in order), else its row-major position."""
    n = t.numel()
    index = torch.arange(n, dtype=torch.int64, device=t.device)
    if n and dense(t):
        return index.as_strided(t.shape, t.stride())
    return index.view(t.shape)


_M64 = (1 << 64) - 1


def _signed64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


@torch.compiler.disable  # plain int arithmetic: Dynamo would trace it on symbolic ints
def param_seed(ordinal: int, base: int = 0) -> int:
    """The seed of the ``ordinal``-th param of an optimizer (its position over all param groups
    when its state was made): splitmix64 of ``base + ordinal``, as a signed int64 (the bits are
    what count), so that params and runs get unrelated, reproducible streams."""
    z = (base + ordinal + 1) * 0x9E3779B97F4A7C15 & _M64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
    return _signed64(z ^ (z >> 31))


# The state slot whose random bits round a param stored stochastically (compensation="stochastic",
# Note [param store], csrc/include/fastopt/update_math.h kParamRandomSlot).
PARAM_SLOT = 3


def slot_bits(seed: int, slot: int) -> tuple[int, int]:
    """(seed, half) of state slot ``slot`` (the rule's state order) of a param whose seed is
    ``seed``: slots 0 and 1 take the low and high 16 bits of stream ``seed``, slots 2 and 3 of
    stream ``seed + 1`` (Note [stochastic state], csrc/include/fastopt/update_math.h)."""
    return _signed64(seed + slot // 2), slot % 2
