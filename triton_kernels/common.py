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
def skipped(found_inf_ptr, g_ptrs, tensor_of_chunk, HAS_FOUND_INF: tl.constexpr):
    """This program changes nothing: GradScaler found inf/NaN, or its tensor has no grad this
    step (then it is not updated and keeps its step count, as torch.optim skips it)."""
    absent = not has_grad(g_ptrs, tl.load(tensor_of_chunk + tl.program_id(0)))
    if HAS_FOUND_INF:
        return absent | (tl.load(found_inf_ptr) != 0)
    return absent


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
def read_step(step_ptrs, t):
    """Tensor ``t``'s step tensor and the count this step uses (the stored count + 1)."""
    step_ptr = tl.load(step_ptrs + t).to(tl.pointer_type(tl.float32))
    return step_ptr, tl.load(step_ptr) + 1.0


@triton.jit
def finish_step(step_ptr, step, chunks_of_tensor, done, t):
    """The last program of tensor ``t`` stores its new step count (Note [one-launch step counts])."""
    count = tl.load(chunks_of_tensor + t)
    if count == 1:
        tl.store(step_ptr, step)
    else:
        if tl.atomic_add(done + t, 1) == count - 1:
            tl.store(step_ptr, step)
            tl.store(done + t, 0)


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
#     BLOCK_FN(p_ptr, g_ptr, s0_ptr, s1_ptr, s2_ptr, out_ptr, idx, mask, sc, gs, G, F)
# with its state slots s0..s2 (S: which are present; an absent slot gets the params' address and
# is never read), its per-program scalars `sc`, the grad transform's `gs` = (clip, inv_scale,
# coef) (read here from the kernel's grad arguments), the constexprs every rule shares G = (COMPUTE, P_DTYPE, OUT_DTYPE, MAXIMIZE, MASTER,
# HAS_SCALE, HAS_CLIP, HAS_COEF) and its own flags F. Triton inlines every call: the compiled
# program is the one the kernels wrote out by hand before.
@triton.jit
def _slot_offset(base, table, t, absent_offset, PRESENT: tl.constexpr):
    """``from_base`` for a slot that may be absent: then ``absent_offset`` (an address that is
    never read), aligned."""
    if PRESENT:
        return from_base(base, table, t)
    else:
        return absent_offset, True


@triton.jit
def walk_chunk(BLOCK_FN: tl.constexpr, p_base, g_base, out_base, p_ptrs, g_ptrs, s0_ptrs, s1_ptrs, s2_ptrs, out_ptrs,
               t, start, end, sc, grad_scale_ptr, clip_value, clip_coef_ptr, G: tl.constexpr, F: tl.constexpr,
               S: tl.constexpr, BLOCK: tl.constexpr):
    """Tensor ``t``'s elements [start, end) through ``BLOCK_FN`` (Note [one walk per chunk])."""
    inv_scale, coef = grad_scalars(grad_scale_ptr, clip_coef_ptr, G[5], G[7], G[0])
    gs = (scalar(clip_value, G[0]), inv_scale, coef)
    MASTER: tl.constexpr = G[4]
    S0: tl.constexpr = S[0]
    S1: tl.constexpr = S[1]
    S2: tl.constexpr = S[2]
    p_off, ok = from_base(p_base, p_ptrs, t)
    g_off, g_ok = from_base(g_base, g_ptrs, t)
    s0_off, s0_ok = _slot_offset(p_base, s0_ptrs, t, p_off, S0)
    s1_off, s1_ok = _slot_offset(p_base, s1_ptrs, t, p_off, S1)
    s2_off, s2_ok = _slot_offset(p_base, s2_ptrs, t, p_off, S2)
    out_off, out_ok = _slot_offset(out_base, out_ptrs, t, g_off, MASTER)
    ok = ok & g_ok & s0_ok & s1_ok & s2_ok & out_ok
    tail = start
    if ok:
        tail = start + (end - start) // BLOCK * BLOCK
        for off in tl.range(start // BLOCK * BLOCK, tail, BLOCK):  # start: a multiple of CHUNK
            BLOCK_FN(aligned_ptr(p_base, p_off), aligned_ptr(g_base, g_off), aligned_ptr(p_base, s0_off),
                     aligned_ptr(p_base, s1_off), aligned_ptr(p_base, s2_off), aligned_ptr(out_base, out_off),
                     off + tl.arange(0, BLOCK), None, sc, gs, G, F)
    for off in tl.range(tail, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        BLOCK_FN(p_base + p_off, g_base + g_off, p_base + s0_off, p_base + s1_off, p_base + s2_off,
                 out_base + out_off, idx, idx < end, sc, gs, G, F)


@triton.jit
def block_grad(g_ptr, idx, mask, p, weight_decay, gs, G: tl.constexpr, L2: tl.constexpr):
    """``load_grad`` with the walk's grad transform ``gs`` and shared constexprs ``G``."""
    clip, inv_scale, coef = gs
    return load_grad(g_ptr, idx, mask, p, inv_scale, clip, coef, weight_decay, G[5], G[6], G[7], G[3], L2, G[0])


@triton.jit
def block_store_param(p, p_ptr, out_ptr, idx, mask, G: tl.constexpr):
    """``store_param`` with the walk's shared constexprs ``G``."""
    store_param(p, p_ptr, out_ptr, idx, mask, G[1], G[2], G[4])
