"""Pieces every fastopt Triton kernel shares: the chunk header, pointer tables, per-step scalars
read from device memory, gradient preparation and the step-count protocol.

Note [exact math in Triton]: the update kernels use ``tl.sqrt_rn`` and ``tl.div_rn`` (IEEE
round-to-nearest, as torch's CUDA kernels do), not the approximate ``tl.sqrt`` and ``/``, and
follow torch.optim's order of operations (foreach=False on CUDA):

* what torch computes as Python floats (``1 - beta1``, ``1 - beta2``, ``1 - alpha``, a float
  lr's ``1 - lr * weight_decay``) is computed on the host in float64 and passed in; the per-step
  scalars (``lr / (1 - beta1^t)``, ``sqrt(1 - beta2^t)``, Adagrad's ``lr / (1 + (t - 1) *
  lr_decay)``) are computed per program in float64 from the step count (Note [scalars in
  float64]) and rounded once, from float64 arguments (``tl.float64`` annotations);
* a multiply-add that torch's CUDA kernels fuse (``grad.add(param, alpha=wd)``, ``addcmul``,
  ``lerp``) is an explicit ``tl.fma``; nothing else is contracted (Note [no FMA contraction]);
* every float argument is passed as float64 (``tl.float64`` annotations) and rounded once to the
  compute dtype on the device (``scalar``): a GPU would otherwise round a Python float to float32
  at the launch while Triton's interpreter keeps it in float64, so the interpreter would not see
  what a GPU computes. The compute dtype (``COMPUTE``) is float32, float64 for float64 params.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._plan import NO_GRAD as _NO_GRAD
from .multi_tensor import RANGE_ROW as _RANGE_ROW, RANGE_TENSORS as _RANGE_TENSORS
from ..reference.rounding import (
    INDEX_HI as _INDEX_HI, INDEX_LO as _INDEX_LO, MIX1 as _MIX1, MIX2 as _MIX2, PARAM_SLOT as _PARAM_SLOT,
    SEED_HI as _SEED_HI, SEED_LO as _SEED_LO, STEP as _STEP,
)

# Note [absent grads] (fastopt/_plan.py): the grad table's entry of a param without a grad
NO_GRAD: tl.constexpr = tl.constexpr(_NO_GRAD)


@triton.jit
def chunk_bounds(tensor_of_chunk, start_of_chunk, numels, CHUNK: tl.constexpr):
    """This program's tensor index and element range [start, end) (Note [multi-tensor tables])."""
    pid = tl.program_id(0)
    t = tl.load(tensor_of_chunk + pid)
    start = tl.load(start_of_chunk + pid)
    end = tl.minimum(tl.load(numels + t), start + CHUNK)
    return t, start, end


@triton.jit
def typed_ptr(table, t, DTYPE: tl.constexpr):
    """Tensor ``t``'s address from an int64 pointer table, as a pointer to DTYPE."""
    return tl.load(table + t).to(tl.pointer_type(DTYPE))


@triton.jit
def has_grad(g_ptrs, t):
    """Whether tensor ``t`` has a grad this step (Note [absent grads], fastopt/_plan.py: NO_GRAD
    in the grad table)."""
    return tl.load(g_ptrs + t) != NO_GRAD


@triton.jit
def lr_over(lr_ptr, lr, x, LR_IS_PTR: tl.constexpr):
    """``lr / x`` (x float64) with torch.optim's arithmetic: in float64 for a float lr (``lr`` is a
    float64 argument); in the tensor's dtype for a tensor lr (read through ``lr_ptr``). Float64."""
    if LR_IS_PTR:
        lr_t = tl.load(lr_ptr)
        return div(lr_t, x.to(lr_t.dtype)).to(tl.float64)
    return lr / x


@triton.jit
def neg_lr(lr_ptr, lr, LR_IS_PTR: tl.constexpr, COMPUTE: tl.constexpr):
    """-lr in the compute dtype (a float lr rounded once from its float64 argument)."""
    if LR_IS_PTR:
        return -tl.load(lr_ptr).to(COMPUTE)
    return -scalar(lr, COMPUTE)


@triton.jit
def decoupled_decay(lr_ptr, decay, weight_decay, LR_IS_PTR: tl.constexpr, COMPUTE: tl.constexpr):
    """``1 - lr * weight_decay``: computed on the host (``decay``) for a float lr, as torch does in
    Python; in the lr tensor's dtype for a tensor lr."""
    if LR_IS_PTR:
        lr_t = tl.load(lr_ptr)
        return (1.0 - lr_t * scalar(weight_decay, lr_t.dtype)).to(COMPUTE)
    return scalar(decay, COMPUTE)


@triton.jit
def scalar(x, COMPUTE: tl.constexpr):
    """A float64 argument in the compute dtype, rounded once (Note [exact math in Triton])."""
    return (x + tl.zeros([], tl.float64)).to(COMPUTE)


@triton.jit
def div(a, b):
    """IEEE round-to-nearest division (tl.div_rn takes float32 only; float64 division is IEEE)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def sqrt(x):
    """IEEE round-to-nearest square root (tl.sqrt_rn takes float32 only; float64 sqrt is IEEE)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def grad_scalars(grad_scale_ptr, clip_coef_ptr, HAS_SCALE: tl.constexpr, HAS_COEF: tl.constexpr,
                 COMPUTE: tl.constexpr):
    """1/scale computed as GradScaler.unscale_ does (in float64, rounded once to float32) and the
    norm-clip coefficient, in the compute dtype; 1 where absent."""
    inv_scale = tl.full([], 1.0, COMPUTE)
    coef = tl.full([], 1.0, COMPUTE)
    if HAS_SCALE:
        inv_scale = (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(tl.float32).to(COMPUTE)
    if HAS_COEF:
        coef = tl.load(clip_coef_ptr).to(COMPUTE)
    return inv_scale, coef


@triton.jit
def prepare_grad(g, inv_scale, clip_value, coef, HAS_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr,
                 HAS_COEF: tl.constexpr, MAXIMIZE: tl.constexpr):
    """((clamp(g * inv_scale, +-clip_value)) * coef) * (-1 if maximize): torch's unscale_ ->
    clip_grad_value_ -> clip_grad_norm_ -> maximize. NaN stays NaN (torch.clamp's behaviour)."""
    if HAS_SCALE:
        g = g * inv_scale
    if HAS_CLIP:
        g = tl.where(g < -clip_value, -clip_value, g)
        g = tl.where(g > clip_value, clip_value, g)
    if HAS_COEF:
        g = g * coef
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def lerp(start, end, weight):
    """torch.lerp with a scalar weight (in the compute dtype): its two branches, each a fused
    multiply-add as in torch's CUDA kernel, which also forms ``1 - weight`` in that dtype."""
    diff = end - start
    return tl.where(weight < 0.5, tl.fma(diff, weight, start), tl.fma(-diff, 1.0 - weight, end))


@triton.jit
def addcmul_sq(v, beta, g, one_minus_beta):
    """``v.mul_(beta).addcmul_(g, g, value=1 - beta)`` as torch runs it: a rounded product, then
    one fused multiply-add."""
    return tl.fma(one_minus_beta * g, g, v * beta)


@triton.jit
def one_minus_pow(log_beta, step):
    """1 - beta**step in float64 from log(beta) (a float64 argument) and the float32 step count;
    exact to ~1e-16 relative, rounded by the caller once (Note [scalars in float64])."""
    return 1.0 - tl.exp(step.to(tl.float64) * log_beta)


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to the storage dtype, to nearest even (torch's rounding).

    Note [bf16 rounding]: bfloat16 is rounded by hand on the fp32 bits, because Triton's
    interpreter truncates where the GPU rounds to nearest; one code path gives the same bits on
    both (a NaN stays a quiet NaN)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        out = (bits >> 16).to(tl.uint16)
        out = tl.where(x != x, 0x7FC0, out).to(tl.uint16)
        return out.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def load_as(ptr, idx, mask, COMPUTE: tl.constexpr):
    """``ptr[idx]`` in the compute dtype; masked unless ``mask`` is None (Note [aligned bodies])."""
    if mask is None:
        return tl.load(ptr + idx).to(COMPUTE)
    else:
        return tl.load(ptr + idx, mask=mask, other=0.0).to(COMPUTE)


# Note [aligned bodies]: Triton vectorizes an access only when it can prove the address 16-byte
# aligned and the mask constant across the vector. An address loaded from a pointer table has
# unknown alignment (a `tl.multiple_of` hint on it does not reach the pointer), and `idx < end`
# varies per element, so every access was one 4-byte (or 2-byte) instruction. Instead each slot's
# tensor is addressed from a *base*, a kernel argument of the slot's dtype (Triton specializes an
# argument whose address is a multiple of 16 as such): `base + offset`, the offset in elements from
# the table's address. A program whose offsets all keep 16-byte alignment walks its whole BLOCKs
# unmasked (the offsets declared multiples of 16 bytes, which they were checked to be), then a
# masked tail; any other program takes the masked loop throughout. The interpreter runs both.
@triton.jit
def from_base(base, table, t):
    """Tensor ``t``'s address (from an int64 table) as ``base + offset`` (in elements of base's
    dtype), and whether the offset keeps 16-byte alignment."""
    ELEM: tl.constexpr = base.dtype.element_ty.primitive_bitwidth // 8
    off_bytes = tl.load(table + t) - base.to(tl.int64)
    return off_bytes // ELEM, (off_bytes % 16) == 0


@triton.jit
def aligned_ptr(base, offset):
    """``base + offset`` where the offset was checked to be a multiple of 16 bytes (Note [aligned
    bodies]), written so that the compiler sees it: rounded down to that multiple, which leaves it
    as it is. (A `tl.multiple_of` hint would attach to the op defining its argument: across a call
    that is the call, and every result of it gets the hint.)"""
    VEC: tl.constexpr = 128 // base.dtype.element_ty.primitive_bitwidth
    return base + offset // VEC * VEC


@triton.jit
def load_grad(g_ptr, idx, mask, p, inv_scale, clip_value, coef, weight_decay, HAS_SCALE: tl.constexpr,
              HAS_CLIP: tl.constexpr, HAS_COEF: tl.constexpr, MAXIMIZE: tl.constexpr, L2: tl.constexpr,
              COMPUTE: tl.constexpr):
    """The gradient the update uses: prepared (prepare_grad), then with the L2 term + wd * p
    (clip_value and weight_decay in the compute dtype)."""
    g = prepare_grad(load_as(g_ptr, idx, mask, COMPUTE), inv_scale, clip_value, coef, HAS_SCALE, HAS_CLIP,
                     HAS_COEF, MAXIMIZE)
    if L2:
        g = tl.fma(p, weight_decay, g)  # grad.add(param, alpha=weight_decay): one fused multiply-add
    return g


@triton.jit
def store_param(p, p_ptr, out_ptr, idx, mask, P_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                MASTER: tl.constexpr):
    """The new param; with master weights ``p`` is the fp32 master, and the user's param
    (``out_ptr``) gets it rounded to its dtype."""
    tl.store(p_ptr + idx, to_storage(p, P_DTYPE), mask=mask)
    if MASTER:
        tl.store(out_ptr + idx, to_storage(p, OUT_DTYPE), mask=mask)


# Note [one walk per chunk]: every update kernel walks its chunk the same way (Note [aligned
# bodies]): each slot's tensor as an offset from its base, then whole BLOCKs unmasked where every
# offset keeps 16-byte alignment, then a masked tail. `walk_chunk` is that walk, written once; a
# rule gives its update of one block, called as
#     BLOCK_FN(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, out_ptr, idx, mask, sc, gs, rs, G, F)
# with its state slots s0..s2 (S: which are present; an absent slot gets the params' offset and
# is never read), its per-program scalars `sc`, the grad transform's `gs` = (clip, inv_scale,
# coef) (read here from the kernel's grad arguments), the random streams `rs` of this program's
# tensor (Note [stochastic stores in Triton]), the constexprs every rule shares G = (COMPUTE,
# P_DTYPE, OUT_DTYPE, MAXIMIZE, MASTER, HAS_SCALE, HAS_CLIP, HAS_COEF, S_DTYPE, STOCHASTIC, STORE)
# and its own flags F. The state slots are offsets from `s_base` (a tensor of the state's dtype:
# bfloat16 with stochastic state), out_ptr is the param's compensation buffer with STORE == KAHAN.
# Triton inlines every call: the compiled program is the one the kernels wrote out by hand before.
@triton.jit
def _slot_offset(base, table, t, absent_offset, PRESENT: tl.constexpr):
    """``from_base`` for a slot that may be absent: then ``absent_offset`` (an address that is
    never read), aligned."""
    if PRESENT:
        return from_base(base, table, t)
    else:
        return absent_offset, True


@triton.jit
def walk_chunk(BLOCK_FN: tl.constexpr, p_base, g_base, out_base, s_base, p_ptrs, g_ptrs, s0_ptrs, s1_ptrs, s2_ptrs,
               out_ptrs, seed_ptrs, t, step, start, end, sc, grad_scale_ptr, clip_value, clip_coef_ptr,
               G: tl.constexpr, F: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr):
    """The elements [start, end) from tensor ``t``'s addresses (a range's first tensor: Note [one
    program per chunk of a range]) through ``BLOCK_FN`` (Note [one walk per chunk]); ``step``: the
    count after this step (the random streams, of a tensor never joined, are keyed by it)."""
    inv_scale, coef = grad_scalars(grad_scale_ptr, clip_coef_ptr, G[5], G[7], G[0])
    gs = (scalar(clip_value, G[0]), inv_scale, coef)
    rs = random_streams(seed_ptrs, t, step, start, G[9] or G[10] == STORE_STOCHASTIC)
    WITH_OUT: tl.constexpr = G[4] or G[10] == STORE_KAHAN
    S0: tl.constexpr = S[0]
    S1: tl.constexpr = S[1]
    S2: tl.constexpr = S[2]
    p_off, ok = from_base(p_base, p_ptrs, t)
    g_off, g_ok = from_base(g_base, g_ptrs, t)
    s0_off, s0_ok = _slot_offset(s_base, s0_ptrs, t, p_off, S0)
    s1_off, s1_ok = _slot_offset(s_base, s1_ptrs, t, p_off, S1)
    s2_off, s2_ok = _slot_offset(s_base, s2_ptrs, t, p_off, S2)
    out_off, out_ok = _slot_offset(out_base, out_ptrs, t, g_off, WITH_OUT)
    ok = ok & g_ok & s0_ok & s1_ok & s2_ok & out_ok & (start % BLOCK == 0)
    tail = start
    if ok:
        tail = start + (end - start) // BLOCK * BLOCK
        for off in tl.range(start // BLOCK * BLOCK, tail, BLOCK):  # start: a multiple of BLOCK
            BLOCK_FN(aligned_ptr(p_base, p_off), aligned_ptr(g_base, g_off), aligned_ptr(s_base, s0_off),
                     aligned_ptr(s_base, s1_off), aligned_ptr(s_base, s2_off), aligned_ptr(out_base, out_off),
                     off + tl.arange(0, BLOCK), None, sc, gs, rs, G, F)
    for off in tl.range(tail, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        BLOCK_FN(p_base + p_off, g_base + g_off, s_base + s0_off, s_base + s1_off, s_base + s2_off,
                 out_base + out_off, idx, idx < end, sc, gs, rs, G, F)


# Note [one program per chunk of a range]: the update kernels' programs, one per row of the plan's
# range table (Note [ranges on the GPU], csrc/include/fastopt/range_table.h: RANGE_ROW values a
# chunk, then two a tensor). A program walks its chunk [lo, hi) of the range from the range's
# first tensor t0 (whose addresses are the range's) as one tensor when the tensors it covers, a
# to b (at most RANGE_TENSORS: one lane each), all have the same step count, with that count's
# scalars; else tensor by tensor, each its part of the chunk with its own count's (a step count
# written by hand, or a tensor skipped in an earlier step: slower, the same results). Then it
# finishes the step count of each (Note [one-launch step counts], multi_tensor.py): the counts
# are read before its bumps of their counters. A rule gives its per-count scalars as
#     SCALARS(step, H, G, F)
# (``H``: its runtime hyperparameters; G[11] is LR_IS_PTR) and its block update (Note [one walk
# per chunk]).
RANGE_ROW: tl.constexpr = tl.constexpr(_RANGE_ROW)
RANGE_TENSORS: tl.constexpr = tl.constexpr(_RANGE_TENSORS)


@triton.jit
def _step_count(step_ptrs, u):
    """Tensor ``u``'s step count as stored (before this step)."""
    return tl.load(tl.load(step_ptrs + u).to(tl.pointer_type(tl.float32)))


@triton.jit
def update_chunk(SCALARS: tl.constexpr, BLOCK_FN: tl.constexpr, H, chunks, per_tensor, numels, done, step_ptrs,
                 p_base, g_base, out_base, s_base, p_ptrs, g_ptrs, s0_ptrs, s1_ptrs, s2_ptrs, out_ptrs, seed_ptrs,
                 grad_scale_ptr, clip_value, clip_coef_ptr, found_inf_ptr, G: tl.constexpr, F: tl.constexpr,
                 S: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """This program's chunk (Note [one program per chunk of a range]). Nothing changes when
    GradScaler found inf/NaN or the chunk's tensor has no grad this step (then it keeps its step
    count, as torch.optim skips it; a tensor without a grad is never joined)."""
    row = chunks + tl.program_id(0) * RANGE_ROW
    t0 = tl.load(row)
    skip = not has_grad(g_ptrs, t0)
    if HAS_FOUND_INF:
        skip = skip | (tl.load(found_inf_ptr) != 0)
    if not skip:
        a = tl.load(row + 1)
        b = tl.load(row + 2)
        lo = tl.load(row + 3)
        hi = tl.load(row + 4)
        us = a + tl.arange(0, RANGE_TENSORS)  # the covered tensors, a lane each
        covered = us <= b
        count_ptrs = tl.load(step_ptrs + us, mask=covered, other=0).to(tl.pointer_type(tl.float32))
        counts = tl.load(count_ptrs, mask=covered, other=0.0)
        count = _step_count(step_ptrs, a)
        if tl.sum((covered & (counts != count)).to(tl.int32), axis=0) == 0:
            step = count + 1.0
            walk_chunk(BLOCK_FN, p_base, g_base, out_base, s_base, p_ptrs, g_ptrs, s0_ptrs, s1_ptrs, s2_ptrs,
                       out_ptrs, seed_ptrs, t0, step, lo, hi, SCALARS(step, H, G, F), grad_scale_ptr, clip_value,
                       clip_coef_ptr, G, F, S, BLOCK)
        else:
            for u in tl.range(a, b + 1):
                step = _step_count(step_ptrs, u) + 1.0
                offset = tl.load(per_tensor + 2 * u)
                walk_chunk(BLOCK_FN, p_base, g_base, out_base, s_base, p_ptrs, g_ptrs, s0_ptrs, s1_ptrs, s2_ptrs,
                           out_ptrs, seed_ptrs, t0, step, tl.maximum(lo, offset),
                           tl.minimum(hi, offset + tl.load(numels + u)), SCALARS(step, H, G, F), grad_scale_ptr,
                           clip_value, clip_coef_ptr, G, F, S, BLOCK)
        # each covered tensor's new count, stored by the last program of those covering it
        covers = tl.load(per_tensor + 2 * us + 1, mask=covered, other=1)
        shared = covered & (covers > 1)
        before = tl.atomic_add(done + us, 1, mask=shared)
        last = shared & (before == covers - 1)
        tl.store(count_ptrs, counts + 1.0, mask=covered & ((covers == 1) | last))
        tl.store(done + us, 0, mask=last)


@triton.jit
def block_grad(g_ptr, idx, mask, p, weight_decay, gs, G: tl.constexpr, L2: tl.constexpr):
    """``load_grad`` with the walk's grad transform ``gs`` and shared constexprs ``G``."""
    clip, inv_scale, coef = gs
    return load_grad(g_ptr, idx, mask, p, inv_scale, clip, coef, weight_decay, G[5], G[6], G[7], G[3], L2, G[0])


@triton.jit
def block_param(p_ptr, out_ptr, idx, mask, G: tl.constexpr):
    """The param the update runs on, in the compute dtype: with STORE == KAHAN the stored param
    plus its compensation buffer (``out_ptr``, Note [param store], update_math.h)."""
    p = load_as(p_ptr, idx, mask, G[0])
    if G[10] == STORE_KAHAN:
        p = p + load_as(out_ptr, idx, mask, G[0])
    return p


@triton.jit
def block_store_param(p, p_ptr, out_ptr, idx, mask, rs, G: tl.constexpr):
    """The new param ``p`` stored as Note [param store] (update_math.h) says: rounded to nearest
    (``store_param``: and the user's param from the master), or with STORE == KAHAN rounded to
    nearest with the rest in the compensation buffer ``out_ptr`` (0 where the param is not
    finite), or with STORE == STOCHASTIC rounded stochastically with the bits of state slot 3."""
    STORE: tl.constexpr = G[10]
    P_DTYPE: tl.constexpr = G[1]
    if STORE == STORE_KAHAN:
        rounded = to_storage(p, P_DTYPE)
        back = rounded.to(tl.float32)
        rest = tl.where(tl.abs(back) <= FLOAT32_MAX, p - back, 0.0)
        tl.store(p_ptr + idx, rounded, mask=mask)
        tl.store(out_ptr + idx, to_storage(rest, P_DTYPE), mask=mask)
    elif STORE == STORE_STOCHASTIC:
        tl.store(p_ptr + idx, bf16_stochastic(p, slot_bits(rs, idx, PARAM_RANDOM_SLOT)), mask=mask)
    else:
        store_param(p, p_ptr, out_ptr, idx, mask, P_DTYPE, G[2], G[4])


@triton.jit
def store_state(x, ptr, idx, mask, SLOT: tl.constexpr, rs, G: tl.constexpr):
    """State slot ``SLOT``'s new value ``x``: rounded stochastically to bfloat16 with the slot's
    random bits when STOCHASTIC (Note [stochastic state], update_math.h), else to its storage
    dtype S_DTYPE to nearest."""
    if G[9]:
        tl.store(ptr + idx, bf16_stochastic(x, slot_bits(rs, idx, SLOT)), mask=mask)
    else:
        tl.store(ptr + idx, to_storage(x, G[8]), mask=mask)


# Note [stochastic stores in Triton]: the bits of Note [deterministic stochastic rounding]
# (csrc/include/fastopt/stochastic_round.h; its specification fastopt/reference/rounding.py), so
# that the Triton kernels store what the reference rules and the C++ kernels store. A program
# sums the part of the word mix its chunk shares (seed, step, the high 32 bits of the index) once
# per stream, in uint64 products of 32-bit values masked to 32 bits (no product overflows 64 bits,
# which Triton's interpreter would warn of); each element adds its low index word and runs the
# finalizer in uint32 arithmetic, which wraps on the GPU and in the interpreter (numpy arrays).
# Stream 0 (the param's seed) gives state slots 0 and 1 their low and high 16 bits, stream 1
# (seed + 1) slots 2 and 3 (3: the param's, compensation="stochastic").
STORE_NEAREST: tl.constexpr = tl.constexpr(0)
STORE_KAHAN: tl.constexpr = tl.constexpr(1)
STORE_STOCHASTIC: tl.constexpr = tl.constexpr(2)
PARAM_RANDOM_SLOT: tl.constexpr = tl.constexpr(_PARAM_SLOT)
FLOAT32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
_M32: tl.constexpr = tl.constexpr(0xFFFFFFFF)
_K_SEED_LO: tl.constexpr = tl.constexpr(_SEED_LO)
_K_SEED_HI: tl.constexpr = tl.constexpr(_SEED_HI)
_K_STEP: tl.constexpr = tl.constexpr(_STEP)
_K_INDEX_LO: tl.constexpr = tl.constexpr(_INDEX_LO)
_K_INDEX_HI: tl.constexpr = tl.constexpr(_INDEX_HI)
_K_MIX1: tl.constexpr = tl.constexpr(_MIX1)
_K_MIX2: tl.constexpr = tl.constexpr(_MIX2)


@triton.jit
def _low32(x):
    """The low 32 bits of an int64 or uint64 ``x``, as uint64 (the mask typed: a bare 0xFFFFFFFF
    is an out-of-range int32 to Triton's interpreter)."""
    return x.to(tl.uint64, bitcast=True) & tl.full([], _M32, tl.uint64)


@triton.jit
def _mul_lo(a, K: tl.constexpr):
    """(a * K) mod 2^32 for a uint64 ``a`` below 2^32: the product fits in 64 bits."""
    return _low32(a * tl.full([], K, tl.uint64))


@triton.jit
def _stream_base(seed_lo, seed_hi, step, index_hi):
    """The word mix of (seed, step, index_hi), uint64 words below 2^32, as uint32."""
    h = _mul_lo(seed_lo, _K_SEED_LO) + _mul_lo(seed_hi, _K_SEED_HI) + _mul_lo(step, _K_STEP)
    h = h + _mul_lo(index_hi, _K_INDEX_HI)
    return _low32(h).to(tl.uint32)


@triton.jit
def random_streams(seed_ptrs, t, step, start, NEEDED: tl.constexpr):
    """The bases of tensor ``t``'s two streams (seed and seed + 1) at count ``step`` for the
    chunk that begins at element ``start`` (a chunk never crosses a multiple of 2^32)."""
    if NEEDED:
        seed = tl.load(seed_ptrs + t).to(tl.uint64, bitcast=True)
        lo = _low32(seed)
        hi = seed >> 32  # logical: uint64
        step_ = _low32(step.to(tl.int64))
        index_hi = _low32(start >> 32)
        lo1 = lo + 1  # seed + 1, carried into the high word, mod 2^64
        hi1 = _low32(hi + (lo1 >> 32))
        return _stream_base(lo, hi, step_, index_hi), _stream_base(_low32(lo1), hi1, step_, index_hi)
    else:
        zero = tl.full([], 0, tl.uint32)
        return zero, zero


@triton.jit
def slot_bits(rs, idx, SLOT: tl.constexpr):
    """The 16 random bits (in the low half of a uint32) of state slot ``SLOT`` at the elements
    ``idx`` (int64, their index in the tensor's memory)."""
    h = rs[SLOT // 2] + _low32(idx.to(tl.int64)).to(tl.uint32) * tl.full([], _K_INDEX_LO, tl.uint32)
    h = h ^ (h >> 16)
    h = h * tl.full([], _K_MIX1, tl.uint32)
    h = h ^ (h >> 15)
    h = h * tl.full([], _K_MIX2, tl.uint32)
    h = h ^ (h >> 16)
    if SLOT % 2 == 1:
        h = h >> 16
    return h


@triton.jit
def bf16_stochastic(x, r):
    """float32 ``x`` rounded to bfloat16 with the random bits ``r`` (their low 16 count): the
    bits added below the kept 16, then truncated; a NaN stays a quiet NaN (stochastic_round.h)."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = ((u + (r & 0xFFFF)) >> 16).to(tl.uint16)
    nan = ((u >> 16) | 0x40).to(tl.uint16)
    out = tl.where((u & 0x7FFFFFFF) > 0x7F800000, nan, rounded)
    return out.to(tl.bfloat16, bitcast=True)
