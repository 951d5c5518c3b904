"""Fuzzing fastopt against torch.optim with sequences of what users do (#14).

Each sequence builds params (mixed float32/float64, empty, 0-dim, transposed) in one or two
param groups, a fastopt optimizer and its torch.optim twin (``foreach=False``) with a random
configuration, and applies the same random actions to both: steps with grads as autograd makes
them or as people assign them (some absent, some laid out unlike the param), ``zero_grad``, lr
changes, in-place writes and replacements of params, dtype changes of a param or of everything,
grads of another dtype or shape, new param groups, another optimizer's state dict, checkpoints
moved either way, deepcopy and pickle. After every action both sides must agree: equal params and
state (within per-dtype tolerances), or both raise — and then fastopt must have changed nothing
(torch's single-tensor loop may have updated some params before it raised: the sequence ends).

``FASTOPT_FUZZ_SEQUENCES`` sets the number of sequences per (optimizer, backend) (default 30 in the
suite; ``make asan`` runs more under AddressSanitizer). A failure prints the seed and the actions:
``FASTOPT_FUZZ_SEED=<seed>`` replays that one sequence.
"""

from __future__ import annotations

import copy
import io
import os
import random
from typing import Optional

import pytest
import torch

import fastopt
from specs import NAMES, TOL

SEQUENCES = int(os.environ.get("FASTOPT_FUZZ_SEQUENCES", "30"))
ONLY_SEED = os.environ.get("FASTOPT_FUZZ_SEED")
OTHER = {torch.float32: torch.float64, torch.float64: torch.float32}
# Differences that are deliberate (README, "Deliberate differences"): torch.optim's single-tensor
# RMSprop and Adagrad update a float32 state with a float64 grad (in-place type promotion), and
# Adam's refuses it; fastopt refuses a grad whose dtype is not its param's for every optimizer,
# before anything is written (its kernels read the grad as the param's type).
REFUSED_ALWAYS = {"grad of another dtype"}
# The same for a param whose dtype changed after its state was made: torch's Adam refuses it, its
# single-tensor Adagrad and RMSprop keep the state in the old dtype and mix precisions; fastopt
# refuses it for every optimizer, with the way out in the message's README section
# (optimizer.load_state_dict(optimizer.state_dict()) casts the state to the params' new dtypes).
REFUSED_STATE = "was the param's dtype or shape changed after its state was made"

# Note [fuzzing the low-precision modes]: state_dtype and compensation (issue 27) have no torch.optim
# twin; their twin is fastopt's reference rules with the same extras (the specification the kernels
# store the bits of, up to float32 rounding), and the params are bf16 and float32 (float64 ones are
# refused with state_dtype). A float32 difference of an ulp moves a bf16 rounding (stochastic or to
# nearest) to the neighbouring bf16 value, and a value one bf16 ulp (2^-8 relative) off moves the
# next steps' results by about as much: a few such over a sequence are allowed (4 ulps, relative to
# the tensor's largest element as _close scales it). A wrong rounding or formula is off by far more.
LOW_PRECISION = {
    "bf16-state": {"state_dtype": torch.bfloat16},
    "kahan-bf16-state": {"state_dtype": torch.bfloat16, "compensation": "kahan"},
    "stochastic": {"compensation": "stochastic"},
}
LOW_DTYPES = (torch.bfloat16, torch.bfloat16, torch.float32)
LOW_OTHER = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float32}
LOW_TOL = dict(rtol=4 * 2.0**-8, atol=1e-6)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> bool:
    """Elementwise closeness with the absolute part scaled by the tensor's largest element: the
    sequences use large, alternating grads, and a momentum buffer or moment that is a sum of terms
    of opposite signs carries rounding differences of the size of its terms, not of the result
    (seen: an RMSprop momentum buffer of -0.35 made of terms of size 6 differed by 16 ulps of 6).
    A wrong formula is off by far more than this."""
    scale = expected.abs().max().item() if expected.numel() and expected.isfinite().all() else 0.0
    return torch.allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale,
                          equal_nan=True)


def _config(rng: random.Random, name: str) -> dict:
    if name in ("Adam", "AdamW"):
        cfg = dict(lr=rng.choice([1e-3, 1e-2]), amsgrad=rng.random() < 0.3, maximize=rng.random() < 0.2,
                   weight_decay=rng.choice([0.0, 0.1]), betas=rng.choice([(0.9, 0.999), (0.5, 0.6)]))
    elif name == "Adagrad":
        cfg = dict(lr=rng.choice([0.01, 0.1]), lr_decay=rng.choice([0.0, 0.1]), maximize=rng.random() < 0.2,
                   weight_decay=rng.choice([0.0, 0.1]), initial_accumulator_value=rng.choice([0.0, 0.1]))
    elif name == "RMSprop":
        cfg = dict(lr=rng.choice([1e-3, 1e-2]), centered=rng.random() < 0.4, maximize=rng.random() < 0.2,
                   momentum=rng.choice([0.0, 0.9]), weight_decay=rng.choice([0.0, 0.1]))
    else:
        nesterov = rng.random() < 0.3
        cfg = dict(lr=rng.choice([1e-3, 1e-2, 0.1]), momentum=rng.choice([0.9] if nesterov else [0.0, 0.9]),
                   dampening=0.0 if nesterov else rng.choice([0.0, 0.5]), nesterov=nesterov,
                   maximize=rng.random() < 0.2, weight_decay=rng.choice([0.0, 0.1]))
    return cfg


def _new_param(rng: random.Random, gen: torch.Generator, device: str,
               dtypes: tuple = (torch.float32, torch.float32, torch.float64)) -> torch.nn.Parameter:
    dtype = rng.choice(dtypes)
    kind = rng.choice(["matrix", "vector", "empty", "scalar", "transposed", "3d"])
    shape = {"matrix": (3, 4), "vector": (5,), "empty": (0,), "scalar": (), "transposed": (4, 3),
             "3d": (2, 3, 2)}[kind]
    t = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    if kind == "transposed":
        t = t.t()
    return torch.nn.Parameter(t)


def _randn(shape, gen, dtype, like: torch.Tensor) -> torch.Tensor:
    """Random values from a CPU generator (the same on every device), on ``like``'s device."""
    return torch.randn(shape, generator=gen, dtype=dtype).to(like.device)


class Side:
    """One optimizer and its params; the same actions are applied to fastopt's and torch's."""

    def __init__(self, params, opt):
        self.params, self.opt = params, opt


def _all_params(side):
    return [p for g in side.opt.param_groups for p in g["params"]]


def _grad_like(p, gen, layout_flip):
    g = _randn(p.shape, gen, p.dtype, p)
    if layout_flip and p.dim() == 2:
        g = _randn(p.shape[::-1], gen, p.dtype, p).t()
    return g


class Fuzz:
    def __init__(self, name: str, backend: str, seed: int, device: str = "cpu", mode: Optional[str] = None):
        """``mode``: a key of LOW_PRECISION; then the twin is fastopt's reference rules with the
        same extras (Note [fuzzing the low-precision modes]), else torch.optim."""
        self.name, self.backend, self.seed, self.device, self.mode = name, backend, seed, device, mode
        self.dtypes = LOW_DTYPES if mode is not None else (torch.float32, torch.float32, torch.float64)
        self.other = LOW_OTHER if mode is not None else OTHER
        self.rng = random.Random(seed)
        self.log: list[str] = []
        self.loose = False  # compare float64 with float32 tolerances from now on (see compare)
        self.kernel = self.reference = 0  # params updated by compiled kernels / the reference rules
        gen = torch.Generator().manual_seed(seed)
        params = [_new_param(self.rng, gen, device, self.dtypes) for _ in range(self.rng.randint(1, 5))]
        cut = self.rng.randint(0, len(params))
        groups = [params[:cut], params[cut:]]
        self.cfg = _config(self.rng, name)
        self.max_norm = 1.0 if self.rng.random() < 0.3 else None
        self.log.append(f"params {[(tuple(p.shape), str(p.dtype)[6:]) for p in params]} cut {cut} "
                        f"cfg {self.cfg} max_norm {self.max_norm} mode {mode}")
        spec = [{"params": g, "lr": self.cfg["lr"] * (i + 1)} for i, g in enumerate(groups) if g]
        ours_groups = [{**s, "params": [p for p in s["params"]]} for s in spec]
        theirs_groups = [{**s, "params": [torch.nn.Parameter(p.detach().clone()) for p in s["params"]]}
                         for s in spec]
        extras = {} if self.max_norm is None else {"max_grad_norm": self.max_norm}
        self.ours = Side(None, getattr(fastopt, name)(ours_groups, backend=backend, **self.cfg, **extras,
                                                      **LOW_PRECISION.get(mode, {})))
        if mode is None:
            self.theirs = Side(None, getattr(torch.optim, name)(theirs_groups, foreach=False, **self.cfg))
        else:
            self.theirs = Side(None, getattr(fastopt, name)(theirs_groups, backend="reference", **self.cfg, **extras,
                                                            **LOW_PRECISION[mode]))

    # -- the comparison -----------------------------------------------------------------------

    def fail(self, what: str):
        pytest.fail(f"{self.name}/{self.backend} seed {self.seed}: {what}\nactions:\n  " + "\n  ".join(self.log))

    def compare(self):
        ours, theirs = _all_params(self.ours), _all_params(self.theirs)
        # With clipping over float32 and float64 params, the one coefficient comes from norms of
        # float32 grads, summed in another order than torch's per-tensor norms (fastopt: one per
        # bucket): float64 params agree to float32 precision then, not float64's.
        # The same after a float32 param became float64: its values carry float32 differences.
        self.loose = self.loose or (self.max_norm is not None and len({p.dtype for p in ours}) > 1)
        mixed = self.loose
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if p.dtype != q.dtype or p.shape != q.shape:
                self.fail(f"param {i}: {p.dtype} {tuple(p.shape)} vs torch's {q.dtype} {tuple(q.shape)}")
            tol = LOW_TOL if self.mode is not None else TOL[torch.float32 if mixed else p.dtype]
            if not _close(p.detach(), q.detach(), tol):
                self.fail(f"param {i} differs: max err {(p - q).abs().max().item():.3g}")
            st, sq = self.ours.opt.state.get(p, {}), self.theirs.opt.state.get(q, {})
            if set(sq) - set(st) or (self.mode is not None and set(st) != set(sq)):  # the twin is fastopt's
                self.fail(f"param {i}: state keys {sorted(st)} vs torch's {sorted(sq)}")
            for key, value in sq.items():
                mine = st[key]
                if key in ("step", "seed"):
                    if float(mine) != float(value):
                        self.fail(f"param {i}: step {float(mine)} vs torch's {float(value)}")
                elif not _close(mine.to(value.dtype), value, tol):
                    diff = (mine.to(value.dtype) - value).abs()
                    at = int(diff.flatten().argmax())
                    self.fail(f"param {i}: state {key!r} differs (max err {diff.max().item():.3g} at {at}: "
                              f"{mine.flatten()[at].item()} vs torch's {value.flatten()[at].item()})")

    def snapshot(self):
        opt = self.ours.opt
        return ([p.detach().clone() for p in _all_params(self.ours)],
                {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items() if s})

    def unchanged_since(self, snap):
        params, state = snap
        for i, (p, b) in enumerate(zip(_all_params(self.ours), params)):
            if p.shape != b.shape or p.dtype != b.dtype:
                continue  # the action itself changed it
            if not torch.equal(p.detach(), b):
                self.fail(f"a step that raised moved param {i}")
        now = {id(p): s for p, s in self.ours.opt.state.items() if s}
        if now.keys() != state.keys():
            self.fail("a step that raised created or removed state")
        for pid, s in now.items():
            if s.keys() != state[pid].keys() or not all(torch.equal(v, state[pid][k]) for k, v in s.items()):
                self.fail("a step that raised changed the state")

    def both(self, label: str, fn, *, compare=True) -> bool:
        """Apply ``fn(side, which)`` to both sides; False when the sequence must end."""
        self.log.append(label)
        snap = self.snapshot()
        errors = []
        for which, side in (("ours", self.ours), ("theirs", self.theirs)):
            try:
                fn(side, which)
                errors.append(None)
            except (RuntimeError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
                errors.append(exc)
        mine, theirs = errors
        if mine is None and theirs is None:
            if label.startswith("step"):
                stats = self.ours.opt.step_stats
                self.kernel, self.reference = self.kernel + stats.kernel, self.reference + stats.reference
            if compare:
                self.compare()
            return True
        if mine is not None and theirs is not None:
            self.log.append(f"  both raised: {type(mine).__name__}: {str(mine)[:120]}")
            self.unchanged_since(snap)
            return False
        if mine is not None and (label.split(":")[0] in REFUSED_ALWAYS or REFUSED_STATE in str(mine)):
            self.log.append(f"  refused (deliberate): {str(mine)[:120]}")
            self.unchanged_since(snap)
            return False
        self.fail(f"{label}: fastopt {'raised ' + repr(mine) if mine else 'did not raise'}, torch "
                  f"{'raised ' + repr(theirs) if theirs else 'did not raise'}")

    # -- the actions ----------------------------------------------------------------------------

    def step(self, autograd: bool) -> bool:
        gen_seed = self.rng.randrange(1 << 30)
        absent = {i for i in range(len(_all_params(self.ours))) if self.rng.random() < 0.2}
        flip = {i for i in range(len(_all_params(self.ours))) if self.rng.random() < 0.3}

        def act(side, which):
            gen = torch.Generator().manual_seed(gen_seed)
            params = _all_params(side)
            if autograd:
                side.opt.zero_grad(set_to_none=True)
                weights = [_randn(p.shape, gen, p.dtype, p) for p in params]
                loss = sum(((p * w).sum() + (p * p).sum()).double() for p, w in zip(params, weights))
                loss.backward()
            else:
                for i, p in enumerate(params):
                    g = _grad_like(p, gen, i in flip)
                    p.grad = None if i in absent else g
            if which == "theirs" and self.max_norm is not None and self.mode is None:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_norm,
                                               foreach=False)
            self.step_side(side, which)

        return self.both(f"step ({'autograd' if autograd else f'assigned, absent {sorted(absent)}, flipped {sorted(flip)}'})", act)

    def step_side(self, side, which) -> None:
        if which == "theirs" and self.name == "Adagrad" and self.mode is None:
            # torch 2.11's Adagrad makes its state in __init__ only: a param added later has no
            # "sum", and its first step raises KeyError (later torch makes it at the first step, as
            # fastopt does). Make it as torch 2.13 does, at the step, for params with a grad.
            for group in side.opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None and not side.opt.state[p]:
                        side.opt.state[p] = {"step": torch.tensor(0.0), "sum": torch.full_like(
                            p, group["initial_accumulator_value"], memory_format=torch.preserve_format)}
        side.opt.step()

    def run(self, length: int) -> None:
        actions = [
            (10, lambda: self.step(autograd=False)),
            (5, lambda: self.step(autograd=True)),
            (2, self.zero_grad), (2, self.lr_change), (2, self.inplace_write), (2, self.replace_param),
            (1, self.param_dtype), (1, self.everything_dtype), (1, self.grad_dtype), (1, self.grad_shape),
            (1, self.add_group), (1, self.foreign_state_dict), (2, self.checkpoint), (2, self.copy),
        ]
        weights = [w for w, _ in actions]
        for _ in range(length):
            action = self.rng.choices([a for _, a in actions], weights)[0]
            if action() is False:
                return

    def zero_grad(self):
        set_to_none = self.rng.random() < 0.5
        return self.both(f"zero_grad(set_to_none={set_to_none})", lambda s, w: s.opt.zero_grad(set_to_none))

    def lr_change(self):
        factor = self.rng.choice([0.5, 2.0])

        def act(side, which):
            for g in side.opt.param_groups:
                g["lr"] *= factor
        return self.both(f"lr *= {factor}", act)

    def _pick(self):
        return self.rng.randrange(len(_all_params(self.ours)))

    def inplace_write(self):
        i = self._pick()

        def act(side, which):
            with torch.no_grad():
                _all_params(side)[i].mul_(0.5)
        return self.both(f"param {i} *= 0.5 in place", act)

    def replace_param(self):
        i, relay = self._pick(), self.rng.random() < 0.5

        def act(side, which):
            p = _all_params(side)[i]
            p.data = p.data.t().contiguous().t() if relay and p.dim() == 2 else p.data.clone()
        return self.both(f"param {i}.data replaced ({'other layout' if relay else 'same layout'})", act)

    def param_dtype(self):
        self.loose = True
        i = self._pick()

        def act(side, which):
            p = _all_params(side)[i]
            p.grad = None
            p.data = p.data.to(self.other[p.dtype])
        return self.both(f"param {i} to the other dtype (grads follow)", act, compare=False)

    def everything_dtype(self):
        self.loose = True
        dtype = self.rng.choice(sorted(set(self.dtypes), key=str))

        def act(side, which):
            for p in _all_params(side):
                p.grad = None
                p.data = p.data.to(dtype)
        return self.both(f"every param to {dtype}", act, compare=False)

    def grad_dtype(self):
        i = self._pick()
        gen_seed = self.rng.randrange(1 << 30)

        def act(side, which):
            gen = torch.Generator().manual_seed(gen_seed)
            params = _all_params(side)
            for p in params:
                p.grad = _randn(p.shape, gen, p.dtype, p)
            params[i].grad.data = params[i].grad.data.to(self.other[params[i].dtype])
            self.step_side(side, which)
        return self.both(f"grad of another dtype: param {i}", act)

    def grad_shape(self):
        i = self._pick()

        def act(side, which):
            params = _all_params(side)
            for p in params:
                p.grad = torch.ones_like(p)
            params[i].grad.data = torch.ones(params[i].numel() + 3, dtype=params[i].dtype, device=params[i].device)
            self.step_side(side, which)
        return self.both(f"grad of another shape: param {i}", act)

    def add_group(self):
        seed = self.rng.randrange(1 << 30)

        def act(side, which):
            gen = torch.Generator().manual_seed(seed)
            p = _new_param(random.Random(seed), gen, self.device, self.dtypes)
            side.opt.add_param_group({"params": [p], "lr": 0.003})
        return self.both("add_param_group(one new param)", act)

    def foreign_state_dict(self):
        other = {"Adam": "Adagrad", "AdamW": "RMSprop", "Adagrad": "Adam", "RMSprop": "Adagrad", "SGD": "Adam"}[self.name]
        self.log.append(f"load_state_dict of a torch.optim.{other}'s state dict")
        snap = self.snapshot()
        params = _all_params(self.ours)
        clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
        foreign = getattr(torch.optim, other)(clones)
        for c in clones:
            c.grad = torch.ones_like(c)
        foreign.step()
        sd = foreign.state_dict()
        sd["param_groups"] = [{**g, "params": list(range(len(params)))} for g in sd["param_groups"][:1]]
        if len(self.ours.opt.param_groups) != 1:
            return True  # group counts differ: torch's own error; nothing new to learn
        try:
            self.ours.opt.load_state_dict(sd)
        except (KeyError, ValueError) as exc:
            self.log.append(f"  refused: {type(exc).__name__}: {str(exc)[:100]}")
            self.unchanged_since(snap)
            return True
        self.fail("another optimizer's state dict was accepted")

    def checkpoint(self):
        direction = self.rng.choice(["torch -> fastopt", "fastopt -> torch"])

        self.log.append(f"checkpoint {direction}")
        src, dst = (self.theirs, self.ours) if direction == "torch -> fastopt" else (self.ours, self.theirs)
        buf = io.BytesIO()
        torch.save(src.opt.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
        try:
            dst.opt.load_state_dict(sd)
            # loading casts state to the params' dtypes: the other side too, so that a param whose
            # dtype changed earlier is in the same condition on both
            src.opt.load_state_dict(copy.deepcopy(src.opt.state_dict()))
        except (RuntimeError, ValueError, KeyError) as exc:
            self.fail(f"a checkpoint {direction} failed to load: {exc}")
        self.compare()
        return True

    def copy(self):
        how = self.rng.choice(["deepcopy", "pickle"])
        self.log.append(how)
        for side in (self.ours, self.theirs):
            if how == "deepcopy":
                side.opt = copy.deepcopy(side.opt)
            else:
                buf = io.BytesIO()
                torch.save(side.opt, buf)
                buf.seek(0)
                side.opt = torch.load(buf, weights_only=False)
        self.compare()
        return True


def _seeds(name: str, backend: str):
    if ONLY_SEED is not None:
        return [int(ONLY_SEED)]
    base = 1000 * (NAMES.index(name) + 1)
    return [base + i for i in range(SEQUENCES)]


@pytest.mark.parametrize("name", NAMES)
def test_fuzz_against_torch(name, backend, device):
    kernel = reference = 0
    for seed in _seeds(name, backend):
        fuzz = Fuzz(name, backend, seed, device)
        fuzz.run(length=fuzz.rng.randint(5, 15))
        kernel, reference = kernel + fuzz.kernel, reference + fuzz.reference
    # the sequences exercised the backend's kernels (a param laid out unlike its state after a
    # replacement may take the fallback path, so not every update is a kernel's)
    if backend == "reference":
        assert kernel == 0 and reference > 0
    else:
        assert kernel > 10 * reference, (kernel, reference)


@pytest.mark.parametrize("mode", list(LOW_PRECISION))
@pytest.mark.parametrize("name", NAMES)
def test_fuzz_low_precision_against_the_reference(name, mode, backend, device):
    """The same sequences with state_dtype and compensation (Note [fuzzing the low-precision
    modes]): the backend's kernels against the reference rules with the same extras, a third of the
    sequences per mode."""
    if backend == "reference":
        pytest.skip("the twin is the reference backend itself")
    kernel = reference = 0
    for seed in _seeds(name, backend)[: max(1, SEQUENCES // 3)]:
        fuzz = Fuzz(name, backend, seed + 500, device, mode=mode)
        fuzz.run(length=fuzz.rng.randint(5, 15))
        kernel, reference = kernel + fuzz.kernel, reference + fuzz.reference
    assert kernel > 10 * reference, (kernel, reference)
