"""The step plan: the optimizer's tensors grouped by (device, dtype), built once and reused.

Note [the plan life cycle]: building the per-bucket tensor lists (and, in the compiled backends,
the chunk and pointer tables) costs host time proportional to the number of tensors, so a plan is
built once and reused. Its states:

* **build** (``FusedOptimizer._build_plan``): params with a grad are grouped into buckets by
  (device, storage dtype) and, inside a bucket, into segments by param group. A compiled backend
  then splits each segment (``PlannedBackend._plans``): the params whose state is laid out like
  the param (dense, same strides, the dtypes the kernels expect) go into the segment's compiled
  plan; any other param is the segment's *rest*, which takes the fallback path every step (the
  backend's list op or the reference rules) without ever sending the others there.
* **bind** (every step, before anything is written): each plan reads its owners' grads. A grad
  laid out like its param is bound as it is; a dense grad of another layout (``p.grad =
  contiguous_tensor`` for a permuted param) is copied into the param's layout for this step
  (*relaid*: the kernels still run, the plan stays); a param without a grad is skipped by the
  kernels this step (Note [absent grads]: no update, no step count, as torch.optim); a grad of
  another dtype, shape or device raises torch's kind of error with nothing written.
* **stale**: a param whose storage, dtype, shape or strides changed since the build
  (``p.data = ...``, ``model.half()``), a grad that became sparse, a param without a grad at the
  build that now has one, new state keys (a group flag such as amsgrad turned on),
  ``add_param_group`` or ``load_state_dict``: the whole plan is rebuilt, once, at the next step.
* **fall back**: the rest of a segment (above), and every segment under ``torch.compile`` (Dynamo
  cannot trace the host side of a plan; the list ops or the reference rules run instead).

Each step counts how many params went through which path (``FusedOptimizer.step_stats``), so
tests can tell a kernel from a fallback. Not noticed: a state tensor *replaced* in
``optimizer.state[p]`` by hand (changing it in place is fine); ``load_state_dict`` rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from . import _ext


def real_view(t: Tensor) -> Tensor:
    """Complex tensors are updated as their real view (torch.optim does the same)."""
    return torch.view_as_real(t) if t.is_complex() else t


def plain_tensors(*tensors: Any) -> bool:
    """No tensor among ``tensors`` is a subclass with its own ``__torch_dispatch__`` (FSDP2's
    DTensor, a fake or functional tensor): such a tensor has no memory of its own for a kernel to
    walk. Plain subclasses (``nn.Parameter``, a user's subclass without dispatch) are plain."""
    return all(not isinstance(t, Tensor) or type(t) in _PLAIN
               or type(t).__torch_dispatch__ is torch._C._disabled_torch_dispatch_impl for t in tensors)


_PLAIN = (Tensor, torch.nn.Parameter)


# Note [DTensor shards]: an optimizer step is elementwise, so a DTensor param (FSDP2's
# ``fully_shard``) is stepped by stepping its local shard with the local shards of its grad and
# state, when all of them are laid out alike: the same mesh and placements (Shard or Replicate,
# not Partial). Such params form buckets of their own (``Bucket.spec``), whose segments hold the
# local tensors and keep the DTensor params as owners (``Segment.sharded``); each step binds the
# local shards of the params and grads explicitly (a plan cannot read a DTensor's ``.grad``).
# The only cross-rank part is the gradient norm for clipping: a bucket's norm is of this rank's
# shards, and the optimizer reduces it over the mesh dims the params are sharded on (replicated
# dims hold copies and are not counted twice), as DTensor's own norm does. Anything else about
# a DTensor param (another placement for its grad, say) sends it to the reference rules, which
# run on DTensors as torch.optim does.


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def shard_spec(t: Any) -> Optional[tuple]:
    """(mesh, placements) of a DTensor whose local shard a kernel may step; None otherwise."""
    if not is_dtensor(t) or any(pl.is_partial() for pl in t.placements):
        return None
    return t.device_mesh, tuple(t.placements)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of memory in some order of dims."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def walks_with(t: Tensor, ref: Tensor) -> bool:
    """``t`` can be walked linearly alongside ``ref``: strided, dense, the same shape and strides."""
    return t.layout == torch.strided and t.shape == ref.shape and t.stride() == ref.stride() and dense(t)


# Note [absent grads]: the grad address of a planned param without a grad this step (the kernels
# skip it). Not 0: an empty tensor's address may be 0. csrc/include/fastopt/grad_binding.h has the
# C++ twin of what follows.
NO_GRAD = -1
STALE = object()  # bind_grad's answer for a grad that makes the plan stale


class OwnerRecord:
    """A param as its plan was built; ``matches`` is False once its storage, dtype, shape or
    strides changed. The alias keeps the old storage alive, so its address cannot be reused."""

    __slots__ = ("alias", "ptr", "dtype", "shape", "stride")

    def __init__(self, p: Tensor) -> None:
        self.alias = p.detach()
        self.ptr, self.dtype, self.shape, self.stride = p.data_ptr(), p.dtype, p.shape, p.stride()

    def matches(self, p: Tensor) -> bool:
        return (p.data_ptr() == self.ptr and p.dtype == self.dtype and p.shape == self.shape
                and p.stride() == self.stride)


def bind_grad(g: Optional[Tensor], tmpl: Tensor):
    """The grad ``g`` as a plan binds it against ``tmpl`` (the param as planned, real view for
    complex): None without a grad, STALE for a sparse one (or a DTensor grad of a plain param),
    else ``g`` (real view), which ``check_grads`` then checks. The caller relays a grad of another
    layout."""
    if g is None:
        return None
    if g.layout != torch.strided or (plain_tensors(tmpl) and not plain_tensors(g)):
        return STALE  # re-plan: the sparse path, or the reference rules for a DTensor grad
    return torch.view_as_real(g) if g.is_complex() else g


# c10's names of the dtypes, so that the Python twin below words its errors as the C++ check does.
_C10_DTYPE = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
              torch.uint8: "Byte", torch.bool: "Bool"}


def check_grads(grads: list[Tensor], tmpls: list[Tensor], indices: list[int], backend: str) -> None:
    """Raise for a grad the update must not read: another dtype, device or shape than its param's
    (``tmpls``, as ``bind_grad`` saw them). Note [one grad check]: the extension's C++ check
    (grad_binding.h, the one the plans' binding runs) when it is there and Dynamo is not tracing;
    this Python twin, with the same words, only otherwise."""
    if _ext.has_cpu_ops() and not torch.compiler.is_compiling():
        _ext._C.check_grads(grads, tmpls, indices, backend)
        return
    for g, tmpl, index in zip(grads, tmpls, indices):
        if g.dtype != tmpl.dtype:
            raise RuntimeError(f"fastopt ({backend}): expected the grad of param {index} to have dtype "
                               f"{_C10_DTYPE.get(tmpl.dtype, tmpl.dtype)} (the param's), but got "
                               f"{_C10_DTYPE.get(g.dtype, g.dtype)}")
        if g.device != tmpl.device:
            raise RuntimeError(f"fastopt ({backend}): expected the grad of param {index} on {tmpl.device} "
                               f"(the param's device), but got {g.device}")
        if g.shape != tmpl.shape:
            raise RuntimeError(f"fastopt ({backend}): the grad of param {index} has shape {list(g.shape)}, "
                               f"the param {list(tmpl.shape)}")


def state_changed_error(backend: str, key: str, i: int, t: Tensor, needed: str) -> RuntimeError:
    """The error of a param whose dtype or shape changed after its state was made."""
    return RuntimeError(
        f"fastopt ({backend}): state {key!r} of param {i} is {t.dtype} {list(t.shape)}, the update needs "
        f"{needed} (was the param's dtype or shape changed after its state was made? torch.optim's Adam "
        "refuses this too; after a deliberate change, optimizer.load_state_dict(optimizer.state_dict()) "
        "casts the state to the params' dtypes)")


@dataclass
class Segment:
    """The tensors of one param group inside a bucket, in parameter order."""

    group: dict
    owners: list[Tensor] = field(default_factory=list)  # the parameters as the user holds them
    params: list[Tensor] = field(default_factory=list)  # what the update reads and writes
    masters: Optional[list[Tensor]] = None  # fp32 master copies (master weights on)
    states: dict[str, list[Tensor]] = field(default_factory=dict)  # per state key, aligned with params
    steps: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)  # refreshed every step
    is_complex: bool = False
    sharded: bool = False  # owners are DTensors, the other lists their local shards (Note [DTensor shards])
    # per param, the seed of its stochastic rounding (state["seed"]), None without one
    seeds: Optional[list[int]] = None
    # the state is bfloat16 and stored stochastically (Note [stochastic state],
    # csrc/include/fastopt/update_math.h); else it has the params' dtype (float32 masters) and is
    # stored rounded to nearest
    stochastic_state: bool = False
    # how the params are stored (Note [param store]): None (nearest), "kahan" (with
    # ``compensations``, state["compensation"] per param) or "stochastic" (with ``seeds``)
    compensation: Optional[str] = None
    compensations: Optional[list[Tensor]] = None
    _seed_tensor: Optional[Tensor] = field(default=None, repr=False)

    def subset(self, indices: list[int]) -> "Segment":
        """The entries at ``indices``, in order."""
        return Segment(
            self.group,
            owners=[self.owners[i] for i in indices],
            params=[self.params[i] for i in indices],
            masters=None if self.masters is None else [self.masters[i] for i in indices],
            states={k: [v[i] for i in indices] for k, v in self.states.items()},
            steps=[self.steps[i] for i in indices],
            is_complex=any(self.owners[i].is_complex() for i in indices),
            sharded=self.sharded,
            seeds=None if self.seeds is None else [self.seeds[i] for i in indices],
            stochastic_state=self.stochastic_state,
            compensation=self.compensation,
            compensations=None if self.compensations is None else [self.compensations[i] for i in indices],
        )

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype the update expects of param 0's state (every param of a segment has its
        bucket's dtype): bfloat16 with stochastic state, float32 with master weights, else the
        param's (real view for complex)."""
        return self.state_dtype_of(self.params[0]) if self.params else torch.float32

    def state_dtype_of(self, p: Tensor) -> torch.dtype:
        if self.stochastic_state:
            return torch.bfloat16
        return torch.float32 if self.masters is not None else p.dtype

    @property
    def seed_tensor(self) -> Optional[Tensor]:
        """The seeds as an int64 CPU tensor (what the list ops take), made once."""
        if self.seeds is not None and self._seed_tensor is None:
            self._seed_tensor = torch.tensor(self.seeds, dtype=torch.int64)
        return self._seed_tensor

    def with_grads(self, backend: str) -> Optional["Segment"]:
        """This step's entries that have a grad, with ``grads`` set (``self`` when all have);
        None when a grad is sparse (the plan is stale). A grad of another dtype, shape or device
        raises (check_grads)."""
        grads = [bind_grad(p.grad, t) for p, t in zip(self.owners, self.params)]
        if any(g is STALE for g in grads):
            return None
        present = [i for i, g in enumerate(grads) if g is not None]
        check_grads([grads[i] for i in present], [self.params[i] for i in present], present, backend)
        self.check_state(backend)
        if all(g is not None for g in grads):
            seg = self
        else:
            seg = self.subset([i for i, g in enumerate(grads) if g is not None])
            grads = [g for g in grads if g is not None]
        seg.grads = grads
        return seg

    def check_state(self, backend: str) -> None:
        """Every state tensor has its param's shape and the dtype the update expects (float32 with
        master weights, else the param's): a param whose dtype or shape changed after its state
        was made is refused, as torch.optim refuses it, rather than updated with mismatched state."""
        for i, p in enumerate(self.params):
            for key, t, dtype in self.expected_state(i):
                if t.dtype != dtype or t.shape != p.shape:
                    raise state_changed_error(backend, key, i, t, f"{dtype} {list(p.shape)}")

    def check_no_stale_compensation(self, backend: str, p: Tensor, state: dict) -> None:
        """Note [stale compensation]: a "compensation" buffer is refused on a param that is not
        stored with one (a bf16/fp16 param under compensation="kahan" turned float32): its rounding
        errors belong to values the param no longer has, and were the param turned back, the
        buffer would be added to it again. ``p`` is about to join this segment."""
        t = state.get("compensation")
        if t is not None and self.compensations is None:
            raise state_changed_error(backend, "compensation", len(self.owners), t, f"none for a {p.dtype} param")

    def expected_state(self, i: int) -> list[tuple[str, Tensor, torch.dtype]]:
        """(key, tensor, the dtype the update expects) of param ``i``'s state tensors: the rule's
        (``state_dtype_of``) and its compensation buffer (the param's dtype)."""
        p = self.params[i]
        dtype = self.state_dtype_of(p)
        out = [(key, tensors[i], dtype) for key, tensors in self.states.items()]
        if self.compensations is not None:
            out.append(("compensation", self.compensations[i], p.dtype))
        return out

    @property
    def targets(self) -> list[Tensor]:
        """The tensors the update math runs on: the fp32 masters when there are, else the params."""
        return self.masters if self.masters is not None else self.params


@dataclass
class StepStats:
    """How the params of a step were updated (Note [the plan life cycle]): a test of a kernel
    asserts on it that the kernel ran, not a fallback."""

    kernel: int = 0  # by compiled kernels: a backend's plan or its list ops
    relaid: int = 0  # of those, params whose grad was first copied into the param's layout
    reference: int = 0  # by the reference rules: backend="reference", or a fallback to them
    skipped: int = 0  # planned params without a grad this step (not updated, as in torch)

    def count_kernel(self, bound: int, relaid: int, absent: int) -> None:
        self.kernel += bound + relaid
        self.relaid += relaid
        self.skipped += absent

    def count_fallback(self, kind: str, n: int) -> None:
        if kind == "kernel":
            self.kernel += n
        else:
            self.reference += n


@dataclass
class BucketRun:
    """What the bucket's backend keeps between its calls: within a step (bind, then norm, then
    step) and, for the compiled backends, their plans from step to step."""

    compiling: bool = False  # this step is traced by torch.compile: list ops or reference rules only
    now: Optional[list[Segment]] = None  # this step's segments with their grads (the reference path)
    plans: Optional[list[Any]] = None  # a compiled backend's SegmentPlan per segment (backends/planned.py)
    records: Optional[list[list[OwnerRecord]]] = None  # the reference backend's owners as built, per segment


@dataclass
class Bucket:
    """Every tensor of one (device, storage dtype) across all param groups: one launch's worth."""

    device: torch.device
    dtype: torch.dtype
    backend: Any  # a fastopt.backends.base.Backend
    rule: Any  # the update rule, a fastopt.rules.Rule
    segments: list[Segment] = field(default_factory=list)
    run: BucketRun = field(default_factory=BucketRun)
    spec: Optional[tuple] = None  # (mesh, placements) of a bucket of DTensor shards (Note [DTensor shards])


@dataclass
class Plan:
    buckets: list[Bucket]
    sparse: list[tuple[Tensor, dict]]  # (param, group) with a sparse grad (Adagrad only)
    absent: list[Tensor]  # params that had no grad when the plan was built
    state_keys: tuple  # the state keys of every param group (they follow the group's flags)
    masters: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (param, its fp32 master)

    @property
    def sharded(self) -> bool:
        """Some bucket holds DTensor shards (Note [DTensor shards])."""
        return any(b.spec is not None for b in self.buckets)

    def still_holds(self, state_keys: tuple) -> bool:
        """The cheap part of the staleness check (the grads of planned params are checked by the
        backends' bind)."""
        return (
            state_keys == self.state_keys
            and all(p.grad is None for p in self.absent)
            and all(p.grad is not None and p.grad.is_sparse for p, _ in self.sparse)
        )
