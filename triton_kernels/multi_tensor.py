"""The host side of a multi-tensor launch: chunk and pointer tables, built once per plan.

Note [multi-tensor tables]: a launch gets one program per chunk of ``CHUNK`` elements. Program
``i`` reads ``tensor_of_chunk[i]`` and ``start_of_chunk[i]`` (int64: tensors may have 2^31
elements or more), then the addresses of that tensor's param, grad and state from per-slot int64
pointer tables. All tables live on the device and are built once per plan; each step only
re-uploads the grad pointer table, and only when a grad was reallocated. Every tensor, empty ones
too, has at least one chunk, so that its step count is incremented like torch's.

Note [one-launch step counts]: torch keeps one step tensor per param. The update kernel reads it,
uses ``step + 1``, and the program that finishes a tensor's last chunk writes ``step + 1`` back:
each program bumps ``done[t]`` with an atomic add (acquire-release, after its read of the step), and
the one that sees one less than the count of chunks covering t (the range table's, Note [ranges on
the GPU], csrc/include/fastopt/range_table.h) writes the step and resets the counter for the next
launch. No second launch, no host sync, and the same work when replayed in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .._plan import NO_GRAD, STALE, OwnerRecord, bind_grad, check_grads, plain_tensors, walks_with

CHUNK = 16384  # elements per program, as the CUDA engine's (Note [chunk size], csrc/cpu/kernels.h)
BLOCK = 1024  # elements per iteration of a program's loop
RANGE_ROW = 5  # int64 values per chunk in the range table (fastopt/range_table.h, RangeTable::kRow)
RANGE_TENSORS = 64  # the most tensors a chunk of it covers (RangeTable::kMaxTensors)


def _upload(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)  # no host sync
    return host.to(device)


class MultiTensorPlan:
    """Tables for one param group's tensors on one device.

    ``slots`` maps a slot name to a list of tensors aligned by index (an empty list for an absent
    slot); ``grad_slot`` names the slot refreshed every step from the ``owners``' grads. Raises ValueError when an index
    cannot be walked linearly (the caller then takes a copying path).

    How the update stores (Note [stochastic state] and Note [param store], update_math.h):
    ``master``, the ``params_out`` slot holds the user's params of float32 masters (default: when
    that slot has tensors and ``compensation`` is not "kahan"); ``stochastic_state``, the state
    slots are bfloat16, stored stochastically with the ``seeds`` (one int64 per tensor);
    ``compensation``: None, "kahan" (``params_out`` holds the compensation buffers) or
    "stochastic" (the params are stored stochastically with the ``seeds``)."""

    def __init__(self, slots: dict[str, list[Tensor]], steps: list[Tensor], owners: list[Tensor],
                 grad_slot: str = "grads", *, master: Optional[bool] = None, stochastic_state: bool = False,
                 compensation: Optional[str] = None, seeds: Optional[list[int]] = None) -> None:
        first = next(iter(slots.values()))
        n = len(first)
        self.device = first[0].device if n else torch.device("cpu")
        self.grad_slot = grad_slot
        self.dtypes: dict[str, Optional[torch.dtype]] = {}
        self.ptrs: dict[str, Tensor] = {}
        for name, tensors in slots.items():
            if tensors and len(tensors) != n:
                raise ValueError(f"fastopt (triton): slot {name!r} has {len(tensors)} tensors, expected {n}")
            self.dtypes[name] = tensors[0].dtype if tensors else None
            for i, t in enumerate(tensors):
                if t.dtype != self.dtypes[name] or t.device != self.device:
                    raise ValueError(f"fastopt (triton): slot {name!r} mixes dtypes or devices")
                if not walks_with(t, first[i]):
                    raise ValueError(f"fastopt (triton): tensor {i} of slot {name!r} is laid out unlike its param")
        self.numel_list = [t.numel() for t in first]
        tensor_of_chunk, start_of_chunk, chunks_of_tensor = [], [], []
        for t, numel in enumerate(self.numel_list):
            count = max(1, -(-numel // CHUNK))
            tensor_of_chunk += [t] * count
            start_of_chunk += [c * CHUNK for c in range(count)]
            chunks_of_tensor.append(count)
        self.n_chunks = len(tensor_of_chunk)
        dev = self.device
        self.tensor_of_chunk = _upload(tensor_of_chunk, torch.int32, dev)
        self.start_of_chunk = _upload(start_of_chunk, torch.int64, dev)
        self.numels = _upload(self.numel_list, torch.int64, dev)
        self.done = torch.zeros(max(n, 1), dtype=torch.int32, device=dev)
        for t in steps:
            if t.numel() != 1 or t.dtype != torch.float32 or t.device != dev:
                raise ValueError("fastopt (triton): step counts must be 1-element float32 tensors on the params' device")
        self.step_ptrs = _upload([t.data_ptr() for t in steps], torch.int64, dev)
        self.stochastic_state, self.compensation = stochastic_state, compensation
        self.master = bool(slots.get("params_out")) and compensation != "kahan" if master is None else master
        if (stochastic_state or compensation == "stochastic") and (seeds is None or len(seeds) != n):
            raise ValueError(f"fastopt (triton): stochastic stores need one seed per tensor ({n})")
        self.seeds = None if seeds is None else _upload(list(seeds), torch.int64, dev)
        self.keep = (slots, steps)  # the tables hold raw addresses: keep the tensors alive
        self.ptr_values: dict[str, list[int]] = {}
        for name, tensors in slots.items():
            values = [t.data_ptr() for t in tensors] if tensors else [0]
            self.ptr_values[name] = values
            self.ptrs[name] = _upload(values, torch.int64, dev)
        self.templates: list[Tensor] = list(slots[grad_slot])  # the layout a bound grad has
        self._grads: list[Optional[Tensor]] = list(self.templates)
        self.owners = list(owners)  # the user's params, whose .grad bind_grads() reads
        self.records = [OwnerRecord(p) for p in self.owners]
        # Note [the Triton plan binds in C++] (csrc/bindings/grad_binder.cpp); the Python loop below without the extension
        self._binder = _ext._C.GradBinder(self.owners, self.templates) if _ext.has_cpu_ops() else None
        if self._binder is not None:  # Note [state moved in place] (csrc/include/fastopt/state_buffer.h)
            written = [(t, i) for name, tensors in slots.items() if name != grad_slot for i, t in enumerate(tensors)]
            written += [(t, i) for i, t in enumerate(steps)]
            self._binder.watch([t for t, _ in written], [i for _, i in written])
        # Note [ranges on the GPU] (csrc/include/fastopt/range_table.h): the update's chunks, the
        # per-tensor ones above until a bind finds grads back to back where the fixed slots are
        # (the norm keeps those); with the extension only
        self._ranges = None
        if self._binder is not None and n:
            fixed = [(self.ptr_values[name], tensors[0].element_size()) for name, tensors in slots.items()
                     if name != grad_slot and tensors]
            self._ranges = _ext._C.RangeTable(self.numel_list, fixed, self.templates[0].element_size(),
                                              seeds is None, CHUNK)
            table = self._ranges.table(pinned=dev.type == "cuda").to(dev, non_blocking=True)
            capacity = self._ranges.capacity
        else:
            rows = [[t, t, t, start, min(self.numel_list[t], start + CHUNK)]
                    for t, start in zip(tensor_of_chunk, start_of_chunk)]
            table = _upload([v for row in rows for v in row] + [v for c in chunks_of_tensor for v in (0, c)],
                            torch.int64, dev)
            capacity = self.n_chunks
        self.range_table = table
        self.update_chunks = self.n_chunks  # how many programs the update launches (its grid)
        self.range_chunks = table[:RANGE_ROW * capacity]
        self.range_per_tensor = table[RANGE_ROW * capacity:]
        # the norm kernel's scratch: one partial per chunk, a counter, the norm and the coefficient
        acc = torch.float64 if self.dtypes[grad_slot] == torch.float64 else torch.float32
        self.partials = torch.empty(max(self.n_chunks, 1), dtype=acc, device=dev)
        self.norm_counter = torch.zeros(1, dtype=torch.int32, device=dev)

    def bases(self, *slots: str) -> list[Tensor]:
        """A tensor of each slot's dtype whose address the kernels offset every tensor of the slot
        from (Note [aligned bodies], common.py): its first tensor; the params' for an absent slot."""
        params = self.keep[0]["params"][0]
        return [self.keep[0][s][0] if self.keep[0][s] else params for s in slots]

    def __len__(self) -> int:
        return len(self.numel_list)

    def bind_grads(self, owners: Optional[list[Tensor]] = None,
                   grads: Optional[list[Optional[Tensor]]] = None) -> Optional[tuple[int, int, int]]:
        """Point the grad table at the owners' grads of this step, in one pass over the owners
        (Note [the plan life cycle], fastopt/_plan.py). None, binding nothing, when an owner
        changed since the plan was built (the plan is stale); else how many grads were bound as
        they are, relaid (copied into the param's layout), or absent (NO_GRAD: the kernels skip
        that param). A grad of another dtype, shape or device raises before anything is bound.
        With ``owners`` and ``grads`` given (the local shards of DTensor params and of their grads,
        Note [DTensor shards]), those are bound instead of the plan's owners' ``.grad``."""
        if (owners is None) != (grads is None):
            raise ValueError("bind_grads: give both owners and grads, or neither")
        if self._binder is not None:
            result = self._binder.bind(owners, grads, pinned=self.device.type == "cuda")
            if result is None:
                return None
            bound, relaid, absent, table = result
            if table is not None:  # an address changed: upload the grads row, no host sync
                self.ptrs[self.grad_slot].copy_(table, non_blocking=True)
                if self._ranges is not None and self._ranges.update(table):  # other grads join
                    self.range_table.copy_(self._ranges.table(pinned=self.device.type == "cuda"), non_blocking=True)
                    self.update_chunks = self._ranges.n_chunks
            return bound, relaid, absent
        now = self.owners if owners is None else owners
        if len(now) != len(self.records) or (grads is not None and len(grads) != len(self.records)):
            raise ValueError(f"bind_grads: expected {len(self.records)} owners and grads")
        bound_grads, values = [], []
        bound = relaid = absent = 0
        for i, (p, record, tmpl) in enumerate(zip(now, self.records, self.templates)):
            if not plain_tensors(p) or not record.matches(p):
                return None
            g = bind_grad(p.grad if grads is None else grads[i], tmpl)
            if g is STALE:
                return None
            if g is not None:
                check_grads([g], [tmpl], [i], "triton")
            if g is None:
                absent += 1
                values.append(NO_GRAD)
            else:
                if walks_with(g, tmpl):
                    bound += 1
                else:
                    g = torch.empty_like(tmpl).copy_(g)
                    relaid += 1
                values.append(g.data_ptr())
            bound_grads.append(g)
        if values != self.ptr_values[self.grad_slot]:
            self.ptrs[self.grad_slot].copy_(_upload(values, torch.int64, self.device), non_blocking=True)
            self.ptr_values[self.grad_slot] = values
        self._grads = bound_grads  # alive until the launch (Note [grads held only for the step])
        return bound, relaid, absent

    def release_grads(self) -> None:
        """After the step's launch (Note [grads held only for the step], grad_binding.h)."""
        self._grads = None
        if self._binder is not None:
            self._binder.release_grads()
