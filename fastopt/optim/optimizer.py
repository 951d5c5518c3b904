"""The base class of fastopt's optimizers: state, the plan, clipping, AMP and backend dispatch.

A subclass says which rule it runs (``_rule``), which state tensors a param group needs
(``_state_keys``) and which hyperparameters the rule reads (``_hparams``); everything else —
lazy state, the (device, dtype) plan, gradient clipping, GradScaler's unscale and inf skip, master
weights and the state-dict format — lives here, once.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .. import backends
from .. import reference as ref
from .._plan import Bucket, Plan, Segment, StepStats, is_dtensor, local, plain_tensors, real_view, shard_spec
from ..rules import Rule
from ._options import FusedOptions

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device, non_blocking=True)


def _over_shards(bucket: Bucket, norm: Tensor, norm_type: float) -> Tensor:
    """A bucket's gradient norm over every rank: for a bucket of DTensor shards (Note [DTensor
    shards]) the norm of this rank's shards reduced over the mesh dims the params are sharded on,
    as DTensor reduces a norm (p-th powers summed, or the max for inf); replicated dims hold
    copies and are left out. One all-reduce per sharded mesh dim; no host sync. A bucket of
    DTensors on the reference rules has a DTensor norm: its value, to combine with the others."""
    if bucket.spec is None:
        return norm.full_tensor() if is_dtensor(norm) else norm
    mesh, placements = bucket.spec
    dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    if not dims:
        return norm
    inf = math.isinf(norm_type)
    t = norm.clone() if inf else norm ** norm_type
    for dim in dims:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=mesh.get_group(dim))
    return t if inf else t ** (1.0 / norm_type)


def _on_any_rank(found_inf: Tensor, plan: Plan) -> Tensor:
    """GradScaler's found_inf of this rank, or-ed over the ranks that hold the DTensor shards of
    the plan (Note [DTensor shards]): every rank skips the step when any rank's grads hold an inf
    or NaN, so the shards of one param never part ways. (GradScaler computes found_inf from this
    rank's shards only; its scale update stays per rank, as with torch.optim.)"""
    out = found_inf.clone()
    seen = set()
    for b in plan.buckets:
        if b.spec is None or id(b.spec[0]) in seen:
            continue
        seen.add(id(b.spec[0]))
        mesh = b.spec[0]
        for dim in range(mesh.ndim):
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return out


def _write_mark(p: Tensor) -> tuple[int, int]:
    """What changes when ``p`` is written or replaced: its address and its version counter (of
    the local shard for a DTensor: in-place ops on a DTensor write its local tensor)."""
    shard = local(p)
    return shard.data_ptr(), shard._version


class _StepState:
    """What a step changes on the host, kept in an object the optimizer owns.

    Note [step state outside the optimizer]: torch.compile of ``step`` may not set attributes of
    the optimizer itself (Dynamo in torch 2.11 refuses it: "Attempted setattr on a user-defined
    object that does not have an AttributeMutation mutation_type"; 2.13 drops some of them), while
    attributes of a plain object it owns are tracked side effects on every torch. So the plan, the
    last grad norm and the step's counts live here, and the optimizer exposes them as properties.
    """

    def __init__(self) -> None:
        self.plan: Optional[Plan] = None
        self.last_grad_norm: Optional[Tensor] = None
        self.stats = StepStats()
        self.warned_subclass = False
        # (param, state key) pairs the current step created: a step that raises removes them
        self.created: list[tuple[Tensor, str]] = []
        # Note [stale master weights]: per param with a master copy, (address, version) as the
        # last step left it; a param written since then re-seeds its master before the update
        self.master_marks: dict[Tensor, tuple[int, int]] = {}


class FusedOptimizer(Optimizer):
    _rule: Rule  # fastopt/rules.py
    # What a state dict of this class must hold (load_state_dict refuses another optimizer's):
    # the group keys its rule reads (torch's __setstate__ defaults the flags) and the state keys
    # it may keep per param, besides "step" and "master_param".
    _group_keys: tuple[str, ...] = ()
    _state_names: tuple[str, ...] = ()
    _supports_sparse = False
    _sparse_message = "{name} does not support sparse gradients"  # torch's wording, per class

    def __init__(self, params: Any, defaults: dict, options: FusedOptions) -> None:
        self._options = options
        self._run = _StepState()
        super().__init__(params, defaults)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Note [who is told that the step unscales]: torch.amp.GradScaler.step reads this flag;
        when it is True, GradScaler does not unscale the grads itself but hands the step
        ``grad_scale`` and ``found_inf``, which fastopt folds into its one pass (no extra pass over
        the grads, no host sync). Others read the flag too and take True to mean "this optimizer
        cannot be clipped from outside": Lightning's mixed-precision plugin then refuses
        ``gradient_clip_val`` (even in bf16, with no GradScaler at all) and skips its own unscale_.
        torch's non-fused optimizers say False to everyone. So fastopt says True to GradScaler.step
        only, and False to every other caller, which then unscales the grads itself (GradScaler's
        ``unscale_``) before clipping them: GradScaler.step copes with that (it passes
        ``grad_scale=None`` for grads already unscaled and still hands over ``found_inf``), so
        every answer gives torch's results. A caller whose frame is not GradScaler.step's own code
        (a compiled or rewritten frame) gets False: correct, one pass slower."""
        if self.__dict__.get("_amp_scaling_override") is not None:
            return self.__dict__["_amp_scaling_override"]
        caller = sys._getframe(1)
        return caller.f_code.co_name == "step" and caller.f_globals.get("__name__") == "torch.amp.grad_scaler"

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        self.__dict__["_amp_scaling_override"] = bool(value)

    # -- what a subclass provides ------------------------------------------------------------

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        raise NotImplementedError

    def _hparams(self, group: dict) -> dict:
        raise NotImplementedError

    def _initial_value(self, key: str, group: dict) -> float:
        return 0.0

    def _sparse_step(self, param: Tensor, group: dict) -> None:
        raise RuntimeError(self._sparse_message.format(name=type(self).__name__))

    # -- param groups and state ----------------------------------------------------------------

    @property
    def options(self) -> FusedOptions:
        """The fastopt extras this optimizer was built with (max_grad_norm, master_weights, ...)."""
        return self._options

    @property
    def last_grad_norm(self) -> Optional[Tensor]:
        """The total gradient norm before clipping of the last step (a device tensor; None
        without ``max_grad_norm``)."""
        return self._run.last_grad_norm

    @property
    def step_stats(self) -> StepStats:
        """How the params of the last step were updated: by compiled kernels (``kernel``, of
        which ``relaid`` had their grad copied into the param's layout first), by the reference
        rules (``reference``), or not at all for want of a grad (``skipped``)."""
        return self._run.stats

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else params
        if not isinstance(params, set):  # torch raises its own TypeError for sets
            params = list(params)
            if len({id(p) for p in params}) != len(params):
                raise ValueError(
                    "a parameter group with duplicate parameters: each parameter must appear once "
                    "(it would be updated twice per step; torch.optim only warns, fastopt refuses)"
                )
        super().add_param_group({**param_group, "params": params})
        for p in self.param_groups[-1]["params"]:
            backends.resolve(self._options.backend, p.device, real_view(p).dtype)  # a clear error now
        self._run.plan = None

    def __getstate__(self) -> dict:
        # torch keeps defaults, state and param_groups; the fastopt options go along (the plan
        # and the step state are rebuilt)
        return {**super().__getstate__(), "_options": self._options}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._run = _StepState()

    def _uses_master(self, p: Tensor) -> bool:
        return self._options.master_weights and p.dtype in LOW_PRECISION

    def _ensure_state(self, p: Tensor, group: dict) -> dict:
        """Create whatever state ``p`` lacks (lazily, as torch does); returns ``self.state[p]``."""
        state = self.state[p]
        master = self._uses_master(p)
        created = self._run.created
        if "step" not in state:
            created.append((p, "step"))
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in self._state_keys(group):
            if key not in state:
                created.append((p, key))
                value = self._initial_value(key, group)
                state[key] = torch.full_like(
                    p,
                    complex(value, value) if p.is_complex() else value,
                    dtype=torch.float32 if master else p.dtype,
                    memory_format=torch.preserve_format,
                )
        if master and "master_param" not in state:
            created.append((p, "master_param"))
            state["master_param"] = p.detach().to(
                torch.float32, memory_format=torch.preserve_format, copy=True
            )
        return state

    # -- the plan ------------------------------------------------------------------------------

    def _state_key(self) -> tuple:
        return tuple(self._state_keys(g) for g in self.param_groups)

    def _bound_plan(self) -> tuple[Plan, StepStats]:
        """The plan, rebuilt if stale, with this step's grads bound (Note [the plan life cycle])."""
        plan = self._run.plan
        if plan is not None and plan.still_holds(self._state_key()):
            stats = StepStats()
            if all(b.backend.bind(b, stats) for b in plan.buckets):
                return plan, stats
        plan = self._run.plan = self._build_plan()
        stats = StepStats()
        for b in plan.buckets:
            if not b.backend.bind(b, stats):
                raise RuntimeError(f"fastopt: {type(self).__name__} could not bind the gradients of a "
                                   "fresh plan (a gradient changed during the step?)")
        return plan, stats

    def _build_plan(self) -> Plan:
        buckets: dict[tuple, Bucket] = {}
        sparse: list[tuple[Tensor, dict]] = []
        absent: list[Tensor] = []
        masters: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            keys = self._state_keys(group)
            for p in group["params"]:
                if p.grad is None:
                    absent.append(p)
                    continue
                if p.grad.is_sparse and not self._supports_sparse:
                    self._sparse_step(p, group)  # raises torch's error, before any state exists
                state = self._ensure_state(p, group)
                if p.grad.is_sparse:
                    sparse.append((p, group))
                    continue
                view = real_view(p)
                backend = backends.resolve(self._options.backend, p.device, view.dtype)
                spec = None
                if not plain_tensors(p, p.grad, *state.values()):
                    spec = self._shards_for_kernels(p, state, keys, backend)
                    if spec is None:
                        backend = self._subclass_fallback(p, backend)
                key = (p.device, view.dtype, backend.name, None if spec is None else (id(spec[0]), spec[1]))
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = Bucket(p.device, view.dtype, backend, self._rule, spec=spec)
                if not bucket.segments or bucket.segments[-1].group is not group:
                    bucket.segments.append(
                        Segment(
                            group,
                            masters=[] if self._uses_master(p) else None,
                            states={k: [] for k in keys},
                            sharded=spec is not None,
                        )
                    )
                seg = bucket.segments[-1]
                shard = local if spec is not None else (lambda t: t)
                seg.is_complex = seg.is_complex or p.is_complex()
                seg.owners.append(p)
                seg.params.append(real_view(shard(p)))
                seg.steps.append(state["step"])
                for k in keys:
                    seg.states[k].append(real_view(shard(state[k])))
                if seg.masters is not None:
                    seg.masters.append(shard(state["master_param"]))
                    masters.append((p, state["master_param"]))
        return Plan(list(buckets.values()), sparse, absent, self._state_key(), masters)

    @staticmethod
    def _shards_for_kernels(p: Tensor, state: dict, keys: tuple, backend: Any) -> Optional[tuple]:
        """(mesh, placements) when ``backend``'s kernels can step the local shard of the DTensor
        ``p`` (Note [DTensor shards]): its grad and every state tensor (not the step count) are
        DTensors laid out alike, and the shards can be walked together; else None."""
        spec = shard_spec(p)
        if spec is None or backend.name == "reference" or not hasattr(backend, "can_plan"):
            return None
        others = [p.grad] + [state[k] for k in keys] + ([state["master_param"]] if "master_param" in state else [])
        if any(shard_spec(t) != spec for t in others) or not plain_tensors(state["step"]):
            return None
        probe = Segment(None, params=[real_view(local(p))], steps=[state["step"]],
                        states={k: [real_view(local(state[k]))] for k in keys},
                        masters=[local(state["master_param"])] if "master_param" in state else None)
        return spec if backend.can_plan(probe, 0) else None

    def _subclass_fallback(self, p: Tensor, backend: Any) -> Any:
        """The backend for a param that is (or whose grad or state is) a tensor subclass with its
        own dispatch, such as FSDP2's DTensor: the compiled kernels take plain tensors only (their
        raw memory), so it takes the reference rules, which run on any tensor torch's ops accept,
        with a warning once per optimizer (the fallback is also counted in ``step_stats``)."""
        if backend.name == "reference":
            return backend
        if not self._run.warned_subclass:
            self._run.warned_subclass = True
            warnings.warn(
                f"fastopt.{type(self).__name__}: {type(p).__name__} params take the reference path, "
                f"not the {backend.name} kernels (they take plain tensors only); results are the same, "
                "the step is slower", stacklevel=5)
        return backends.resolve("reference", p.device)

    # -- the step ------------------------------------------------------------------------------

    def _amp_tensors(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``grad_scale`` and ``found_inf`` as torch.amp.GradScaler sets them on the optimizer."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        return (
            grad_scale if isinstance(grad_scale, Tensor) else None,
            found_inf if isinstance(found_inf, Tensor) else None,
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():  # Dynamo traces the step itself (no try/except to trace)
            self._step()
            return loss
        self._run.created = []
        try:
            self._step()
        except Exception:
            # A step that raises changes nothing (DESIGN.md, Safety): every check runs before the
            # first write, and the state this step created for the first time is removed again.
            for p, key in self._run.created:
                state = self.state.get(p)
                if state is not None:
                    state.pop(key, None)
                    if not state:
                        del self.state[p]
            self._run.plan = None
            raise
        finally:
            self._run.created = []
        return loss

    def _step(self) -> None:
        opts = self._options
        plan, stats = self._bound_plan()
        stats.reference += len(plan.sparse)
        grad_scale, found_inf = self._amp_tensors()
        if found_inf is not None and any(b.spec is not None for b in plan.buckets):
            found_inf = _on_any_rank(found_inf, plan)
        if plan.sparse and (grad_scale is not None or found_inf is not None or opts.clips_norm
                            or opts.clip_value is not None):
            raise NotImplementedError(
                f"{type(self).__name__}: sparse gradients cannot be combined with gradient clipping "
                "or GradScaler in fastopt"
            )
        xforms = [
            backends.GradTransform(
                grad_scale=_on(grad_scale, b.device), clip_value=opts.clip_value, found_inf=_on(found_inf, b.device)
            )
            for b in plan.buckets
        ]
        if opts.clips_norm:
            if len(plan.buckets) == 1 and plan.buckets[0].spec is None:  # the backend may fuse the coefficient
                b = plan.buckets[0]
                norm, clip_coef = b.backend.norm_and_coef(b, opts.norm_type, xforms[0], opts.max_grad_norm)
            else:
                norms = [_over_shards(b, b.backend.grad_norm(b, opts.norm_type, x), opts.norm_type)
                         for b, x in zip(plan.buckets, xforms)]
                norm = ref.norm_of_norms(norms, opts.norm_type)
                clip_coef = ref.clip_coefficient(norm, opts.max_grad_norm)
            if opts.error_if_nonfinite:
                self._check_finite(norm, found_inf)
            self._run.last_grad_norm = norm
            for b, x in zip(plan.buckets, xforms):
                x.clip_coef = _on(clip_coef, b.device)

        compiling = torch.compiler.is_compiling()
        if plan.masters and not compiling:
            self._reseed_masters(plan)
        for b, x in zip(plan.buckets, xforms):
            b.backend.step(self._rule, b, [self._hparams(s.group) for s in b.segments], x)
        for p, group in plan.sparse:
            self._sparse_step(p, group)
        if plan.masters and not compiling:
            marks = self._run.master_marks
            for p, _ in plan.masters:
                marks[p] = _write_mark(p)
        self._run.stats = stats

    def _check_finite(self, norm: Tensor, found_inf: Optional[Tensor]) -> None:
        """``error_if_nonfinite``: clip_grad_norm_'s error (one host sync), before anything is
        written; not when a GradScaler skips the step anyway."""
        bad = ~torch.isfinite(norm)
        if found_inf is not None:
            bad = bad & (found_inf.to(bad.device) == 0)
        if bool(bad):
            raise RuntimeError(
                f"The total norm of order {self._options.norm_type} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the gradients by the "
                "non-finite norm anyway, set `error_if_nonfinite=False`")

    def _reseed_masters(self, plan: Plan) -> None:
        """Note [stale master weights]: a bf16/fp16 param written since the last step
        (``model.load_state_dict``, an in-place op under no_grad, ``p.data = ...``) gets its fp32
        master re-seeded from it; otherwise the update would start from the old master and undo
        the write. Seen through the param's version counter and address (no pass over memory);
        not seen: an in-place write through ``p.data``, which has a version counter of its own."""
        marks = self._run.master_marks
        for p, master in plan.masters:
            mark = marks.get(p)
            if mark is not None and mark != _write_mark(p):
                master.copy_(p)

    # -- state dict ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by this class or by the torch.optim class of the same name.

        On top of torch's loading: a state tensor whose shape does not match its parameter is
        refused; ``step`` lives on the parameter's device as float32 (no host sync in step());
        with master weights, moments and ``master_param`` of fp16/bf16 params stay float32.
        """
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        name = type(self).__name__
        for i, saved in enumerate(saved_groups):  # another optimizer's state dict: nothing replaced
            for key in self._group_keys:
                if key not in saved:
                    raise KeyError(f"{key!r}: param group {i} of the loaded state dict has no {key!r}, which "
                                   f"{name} needs (is it another optimizer's state dict?)")
        allowed = set(self._state_names) | {"step", "master_param"}
        for saved_id, saved_state in state_dict["state"].items():
            extra = sorted(set(saved_state) - allowed)
            if extra:
                raise ValueError(f"loaded state dict does not belong to {name}: the state of parameter "
                                 f"{saved_id} has {extra}, {name} keeps {sorted(allowed)}")
        if len(groups) == len(saved_groups) and all(
            len(g["params"]) == len(s["params"]) for g, s in zip(groups, saved_groups)
        ):
            id_map = {
                saved_id: p
                for g, s in zip(groups, saved_groups)
                for saved_id, p in zip(s["params"], g["params"])
            }
            for saved_id, saved_state in state_dict["state"].items():
                p = id_map.get(saved_id)
                if p is None:
                    continue
                for key, value in saved_state.items():
                    if key != "step" and isinstance(value, Tensor) and value.shape != p.shape:
                        raise ValueError(
                            f"loaded state dict does not match this optimizer's parameters: state "
                            f"{key!r} of parameter {saved_id} has shape {tuple(value.shape)}, the "
                            f"parameter has shape {tuple(p.shape)}"
                        )
        else:
            id_map = {}
        super().load_state_dict(state_dict)  # torch's own checks of group and parameter counts

        for saved_id, p in id_map.items():
            state = self.state.get(p)
            if not state:
                continue
            state["step"] = torch.as_tensor(state["step"]).to(dtype=torch.float32, device=p.device)
            if self._uses_master(p):
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    if key != "step" and isinstance(value, Tensor):
                        state[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
            else:
                state.pop("master_param", None)
        self._run.plan = None
        self._run.master_marks = {}  # the loaded masters are the truth, whatever was written before
