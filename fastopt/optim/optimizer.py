"""The base class of fastopt's optimizers: the ``torch.optim.Optimizer`` face (param groups,
lazy state, the plan and its life cycle, GradScaler's protocol, master weights).

A subclass says which rule it runs (``_rule``), which state tensors a param group needs
(``_state_keys``); the hyperparameters the rule reads come from the group by the rule's names
(``_hparams``, overridden where a group spells one otherwise). The step itself is
fastopt/functional.py (bind, grad transform, norm, clip coefficient, update); the cross-rank
reductions are fastopt/_distributed.py, a failed step's rollback _rollback.py, the loading of a
state dict _state_dict.py.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import backends, functional
from .._plan import Bucket, Plan, Segment, StepStats, local, plain_tensors, real_view, shard_spec
from ..reference.rounding import param_seed
from ..rules import Rule
from . import _state_dict
from ._options import FusedOptions
from ._rollback import undo_created
from ._state_buffer import StateLayout, replace_in_one_buffer

LOW_PRECISION = (torch.float16, torch.bfloat16)


def number(x: Union[float, Tensor]) -> float:
    """A hyperparameter the rule takes as a number (Adam's betas, SGD's weight_decay) read from a
    1-element tensor once per step. Note [tensor betas]: torch's fused Adam reads tensor betas so
    too, so the bias corrections are computed in float64 (torch's single-tensor path: in the betas'
    dtype); SGD's add(alpha=weight_decay) reads it as a number per param. lr may stay a tensor."""
    return float(x) if isinstance(x, Tensor) else x


def _own_step_count(p: Tensor, fresh: bool) -> Tensor:
    """The step count a plan keeps for a param of a rule whose state has none (SGD, Note [SGD's
    first step], csrc/include/fastopt/update_math.h): 0 when its state was created for this step,
    else 1 (the state holds a step already: loaded, or stepped under an earlier plan). The plan
    keeps it and its kernels count on from there."""
    return torch.full((), 0.0 if fresh else 1.0, dtype=torch.float32, device=local(p).device)


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
        """lr and the rule's hyperparameters (``Rule.hyper``), read from the group under their
        names; a class whose group spells one otherwise (Adam's ``betas``) translates first."""
        return {"lr": group["lr"], **{k: group[k] for k in self._rule.hyper}}

    def _initial_value(self, key: str, group: dict) -> float:
        return 0.0

    def _check_sparse(self, param: Tensor, group: dict) -> None:
        """Raise for a sparse grad this class cannot step (torch's error where torch raises one),
        when the plan is built: before any state exists and anything is written."""
        raise RuntimeError(self._sparse_message.format(name=type(self).__name__))

    def _sparse_step(self, param: Tensor, group: dict) -> None:
        raise NotImplementedError  # a class with _supports_sparse steps its sparse grads here

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

    def _compensation(self, p: Tensor) -> Optional[str]:
        """How ``p`` is stored (Note [param store]): ``compensation`` for a float16/bfloat16 param
        (without master weights: the options refuse both), None for any other."""
        return self._options.compensation if p.dtype in LOW_PRECISION else None

    def _needs_seed(self, p: Tensor) -> bool:
        """Something of ``p`` is rounded stochastically: its state or the param itself."""
        return self._options.state_dtype is not None or self._compensation(p) == "stochastic"

    def _keeps_step(self, p: Tensor) -> bool:
        """``p``'s state holds its step count (``state["step"]``): as torch.optim's for every rule
        but SGD's, and SGD's too where something of ``p`` is rounded stochastically (the random
        bits are keyed by the step, Note [stochastic state]: a plan's own count would start over
        at every re-plan and a resume would not round as the uninterrupted run)."""
        return self._rule.keeps_step or self._needs_seed(p)

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype of ``p``'s state tensors: ``state_dtype`` when set, else float32 with master
        weights, else the param's."""
        if self._options.state_dtype is not None:
            return self._options.state_dtype
        return torch.float32 if self._uses_master(p) else p.dtype

    def _ensure_state(self, p: Tensor, group: dict, ordinal: int = 0, layout: Optional[StateLayout] = None) -> dict:
        """Create whatever state ``p`` lacks (lazily, as torch does); returns ``self.state[p]``
        (an empty dict, not entered into ``self.state``, for a param that keeps no state: SGD
        without momentum, as in torch). ``ordinal``: p's position over all param groups, which
        seeds its stochastic rounding (``state["seed"]``, with ``state_dtype``). With ``layout``,
        the tensors it places are there after ``layout.place()`` (Note [state in one buffer])."""
        keys = self._state_keys(group)
        master = self._uses_master(p)
        stochastic = self._needs_seed(p)
        compensation = self._compensation(p)
        if self._options.state_dtype is not None and p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"fastopt.{type(self).__name__}: state_dtype=torch.bfloat16 is for float32, float16 "
                             f"and bfloat16 params; this one is {p.dtype}")
        if compensation == "stochastic" and p.dtype != torch.bfloat16:
            raise ValueError(f"fastopt.{type(self).__name__}: compensation='stochastic' rounds to bfloat16; this "
                             f"param is {p.dtype} (compensation='kahan' works for float16 params)")
        keeps_step = self._keeps_step(p)
        if not (keys or master or keeps_step or compensation or p in self.state):
            return {}
        state = self.state[p]
        created = self._run.created

        def create(key: str, dtype: torch.dtype, init: Union[complex, float, Tensor], like: Optional[Tensor]) -> None:
            created.append((p, key))
            if layout is not None and layout.add(state, key, dtype, init, like=like, device=p.device):
                return  # Note [state in one buffer]: placed by layout.place()
            if like is None:
                state[key] = torch.full((), init, dtype=dtype, device=p.device)
            elif isinstance(init, Tensor):
                state[key] = init.detach().to(dtype, memory_format=torch.preserve_format, copy=True)
            else:
                state[key] = torch.full_like(like, init, dtype=dtype, memory_format=torch.preserve_format)

        if keeps_step and "step" not in state:
            # Note [SGD's first step]: a momentum buffer there already (a torch.optim.SGD state
            # dict, or one stepped before state_dtype was set) holds a step
            held = not self._rule.keeps_step and any(state.get(k) is not None for k in keys)
            create("step", torch.float32, 1.0 if held else 0.0, None)
        for key in keys:
            if state.get(key) is None:  # None: an old torch.optim.SGD state dict's absent buffer
                value = self._initial_value(key, group)
                create(key, self._state_dtype(p), complex(value, value) if p.is_complex() else value, p)
        if stochastic and "seed" not in state:
            created.append((p, "seed"))
            state["seed"] = torch.tensor(param_seed(ordinal), dtype=torch.int64)
        if compensation == "kahan" and "compensation" not in state:
            create("compensation", p.dtype, 0.0, p)
        if master and "master_param" not in state:
            create("master_param", torch.float32, p, p)
        return state

    # -- the plan ------------------------------------------------------------------------------

    def _state_key(self) -> tuple:
        return tuple(self._state_keys(g) for g in self.param_groups)

    def _bound_plan(self) -> tuple[Plan, StepStats]:
        """The plan, rebuilt if stale, with this step's grads bound (Note [the plan life cycle])."""
        plan = self._run.plan
        if plan is not None and plan.still_holds(self._state_key()):
            stats = functional.bind(plan)
            if stats is not None:
                return plan, stats
        plan = self._run.plan = self._build_plan()
        stats = functional.bind(plan)
        if stats is None:
            raise RuntimeError(f"fastopt: {type(self).__name__} could not bind the gradients of a "
                               "fresh plan (a gradient changed during the step?)")
        return plan, stats

    def _build_plan(self) -> Plan:
        buckets: dict[tuple, Bucket] = {}
        sparse: list[tuple[Tensor, dict]] = []
        absent: list[Tensor] = []
        masters: list[tuple[Tensor, Tensor]] = []
        # (param, group, state keys, state, keeps a step, state fresh): state is created first,
        # for all params, so that it lies in one buffer per key (Note [state in one buffer])
        planned: list[tuple[Tensor, dict, tuple, dict, bool, bool]] = []
        layout = StateLayout.for_this_step()
        ordinal = -1
        for group in self.param_groups:
            keys = self._state_keys(group)
            for p in group["params"]:
                ordinal += 1
                if p.grad is None:
                    absent.append(p)
                    continue
                if p.grad.is_sparse:
                    if self._options.state_dtype is not None or self._compensation(p) is not None:
                        raise NotImplementedError(f"fastopt.{type(self).__name__}: sparse gradients cannot be "
                                                  "combined with state_dtype or compensation")
                    self._check_sparse(p, group)  # raises before any state exists
                keeps_step = self._keeps_step(p)
                # Note [SGD's first step]: is p's state made for this step?
                fresh = not keeps_step and all(self.state.get(p, {}).get(k) is None for k in keys)
                if p.grad.is_sparse:
                    self._ensure_state(p, group, ordinal)
                    sparse.append((p, group))
                    continue
                planned.append((p, group, keys, self._ensure_state(p, group, ordinal, layout), keeps_step, fresh))
        if layout is not None:
            layout.place()
        for p, group, keys, state, keeps_step, fresh in planned:
            view = real_view(p)
            backend = backends.resolve(self._options.backend, p.device, view.dtype)
            spec = None
            steps = state["step"] if keeps_step else _own_step_count(p, fresh)
            if not plain_tensors(p, p.grad, *state.values()):
                spec = self._shards_for_kernels(p, state, keys, backend, steps)
                if spec is None:
                    backend = self._subclass_fallback(p, backend)
            compensation = self._compensation(p)
            # a seed in the state of a param that no longer needs one (a bf16 param turned
            # float32 under compensation="stochastic", whose state had no bf16 moments to
            # refuse the change: SGD without momentum) is kept for its return, not passed on
            needs_seed = self._needs_seed(p)
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
                        seeds=[] if needs_seed else None,
                        stochastic_state=self._options.state_dtype is not None,
                        compensation=compensation,
                        compensations=[] if compensation == "kahan" else None,
                    )
                )
            seg = bucket.segments[-1]
            seg.check_no_stale_compensation(backend.name, p, state)
            shard = local if spec is not None else (lambda t: t)
            seg.is_complex = seg.is_complex or p.is_complex()
            seg.owners.append(p)
            seg.params.append(real_view(shard(p)))
            seg.steps.append(steps)
            for k in keys:
                seg.states[k].append(real_view(shard(state[k])))
            if seg.seeds is not None:
                seg.seeds.append(int(state["seed"]))
            if seg.compensations is not None:
                seg.compensations.append(shard(state["compensation"]))
            if seg.masters is not None:
                seg.masters.append(shard(state["master_param"]))
                masters.append((p, state["master_param"]))
        return Plan(list(buckets.values()), sparse, absent, self._state_key(), masters)

    def _shards_for_kernels(self, p: Tensor, state: dict, keys: tuple, backend: Any, steps: Tensor) -> Optional[tuple]:
        """(mesh, placements) when ``backend``'s kernels can step the local shard of the DTensor
        ``p`` (Note [DTensor shards]): its grad and every state tensor (not the step count
        ``steps``) are DTensors laid out alike, and the shards can be walked together; else None."""
        spec = shard_spec(p)
        if spec is None:
            return None
        extra = [state[k] for k in ("master_param", "compensation") if k in state]
        others = [p.grad] + [state[k] for k in keys] + extra
        if any(shard_spec(t) != spec for t in others) or not plain_tensors(steps):
            return None
        probe = Segment(None, params=[real_view(local(p))], steps=[steps],
                        states={k: [real_view(local(state[k]))] for k in keys},
                        masters=[local(state["master_param"])] if "master_param" in state else None,
                        stochastic_state=self._options.state_dtype is not None,
                        compensations=[local(state["compensation"])] if "compensation" in state else None)
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
            undo_created(self.state, self._run.created)  # Note [a failed step changes nothing]
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
        if plan.sparse and (grad_scale is not None or found_inf is not None or opts.clips_norm
                            or opts.clip_value is not None):
            raise NotImplementedError(
                f"{type(self).__name__}: sparse gradients cannot be combined with gradient clipping "
                "or GradScaler in fastopt"
            )
        keeps_masters = bool(plan.masters) and not torch.compiler.is_compiling()
        norm = functional.step(plan, self._rule, self._hparams, opts, grad_scale=grad_scale, found_inf=found_inf,
                               before_update=(lambda: self._reseed_masters(plan)) if keeps_masters else None)
        if opts.clips_norm:
            self._run.last_grad_norm = norm
        for p, group in plan.sparse:
            self._sparse_step(p, group)
        if keeps_masters:
            marks = self._run.master_marks
            for p, _ in plan.masters:
                marks[p] = _write_mark(p)
        self._run.stats = stats

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

        On top of torch's loading: the whole dict is validated before anything is replaced (another
        optimizer's dict, a state tensor whose shape does not match its parameter are refused);
        ``step`` lives on the parameter's device as float32 (no host sync in step()); with master
        weights, moments and ``master_param`` of fp16/bf16 params stay float32.
        """
        id_map = _state_dict.validate(self, state_dict)
        super().load_state_dict(state_dict)  # torch's own checks of group and parameter counts
        _state_dict.settle(self, state_dict, id_map)
        replace_in_one_buffer(self)  # Note [state in one buffer]
        self._run.plan = None
        self._run.master_marks = {}  # the loaded masters are the truth, whatever was written before
