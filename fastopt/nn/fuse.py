"""``fuse_bn_relu``: replace, in place, each BatchNorm whose only use is a ReLU by the fused module.

Note [finding BatchNorm→ReLU pairs]: the uses of a module's output are read from a torch.fx trace
of ``forward`` (``nn.Sequential`` included). When the whole model does not trace (data-dependent
control flow), each child is traced on its own, recursively, and a BatchNorm called only from code
that did not trace is left alone. A BatchNorm is fused when every call of it feeds exactly one
consumer and that consumer is a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``, in place
or not); an output that also feeds anything else (a residual add) keeps the plain BatchNorm.

The ReLU after a fused BatchNorm becomes redundant but stays correct (ReLU is idempotent). An
``nn.ReLU`` module is replaced by ``nn.Identity`` when the whole model traced and every call of that
module follows a fused BatchNorm; a ReLU module that is also used elsewhere (torchvision's blocks
share one ``self.relu`` with the residual add) becomes a ``SharedReLU``, which skips the calls on a
fused module's output (Note [a shared ReLU after a fused BatchNorm], modules.py).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .modules import BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d, is_fused_output

_FUSED = {nn.BatchNorm1d: BatchNormReLU1d, nn.BatchNorm2d: BatchNormReLU2d, nn.BatchNorm3d: BatchNormReLU3d}
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, torch.nn.functional.relu_)
_RELU_METHODS = ("relu", "relu_")


class SharedReLU(nn.ReLU):
    """An ``nn.ReLU`` called both after a fused BatchNorm and elsewhere: on a fused module's output
    it returns the input as it is (already max(z, 0)); everywhere else it is ``nn.ReLU``
    (Note [a shared ReLU after a fused BatchNorm], modules.py)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and is_fused_output(input):
            return input
        return super().forward(input)


def _trace(module: nn.Module):
    try:
        return torch.fx.Tracer().trace(module)
    except Exception:  # noqa: BLE001  (any failure to trace means: look at the children instead)
        return None


def _graphs(module: nn.Module, prefix: str, out: list) -> bool:
    """Append (prefix, graph) for ``module`` or, where it does not trace, for its descendants;
    True when ``module`` traced as a whole."""
    graph = _trace(module)
    if graph is not None:
        out.append((prefix, graph))
        return True
    for name, child in module.named_children():
        _graphs(child, f"{prefix}{name}.", out)
    return False


def _is_relu_call(node: torch.fx.Node, owner: nn.Module, source: torch.fx.Node) -> bool:
    """Whether ``node`` applies a ReLU to ``source`` (its first argument) and nothing else."""
    if not node.args or node.args[0] is not source:
        return False
    if node.op == "call_module":
        return type(owner.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not any(
            isinstance(v, torch.fx.Node) for v in node.kwargs.values())
    if node.op == "call_method":
        return node.target in _RELU_METHODS and len(node.args) == 1
    return False


def fuse_bn_relu(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace in ``model`` every ``BatchNorm1d/2d/3d`` whose output is only consumed by a ReLU with
    ``BatchNormReLU1d/2d/3d`` sharing its parameters and buffers (state-dict keys unchanged; an
    optimizer built on the model keeps working). Subclasses of BatchNorm and ``SyncBatchNorm`` are
    left alone. Returns ``model`` (changed in place)."""
    graphs: list = []
    whole = _graphs(model, "", graphs)
    bn_ok: dict[str, bool] = {}
    relu_sources: dict[str, list] = defaultdict(list)  # ReLU module -> the BatchNorm each call reads
    for prefix, graph in graphs:
        owner = model.get_submodule(prefix[:-1]) if prefix else model
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            kind = type(owner.get_submodule(node.target))
            if kind is nn.ReLU:
                source = node.args[0] if node.args else None
                from_bn = (isinstance(source, torch.fx.Node) and source.op == "call_module"
                           and type(owner.get_submodule(source.target)) in _FUSED)
                relu_sources[prefix + node.target].append(prefix + source.target if from_bn else None)
            elif kind in _FUSED:
                users = list(node.users)
                ok = len(users) == 1 and _is_relu_call(users[0], owner, node)
                bn_ok[prefix + node.target] = bn_ok.get(prefix + node.target, True) and ok
    for name, ok in bn_ok.items():
        if ok:
            bn = model.get_submodule(name)
            _replace(model, name, _FUSED[type(bn)].from_batchnorm(bn, backend=backend))
    for name, sources in relu_sources.items():
        fused = [s for s in sources if bn_ok.get(s, False)]
        if whole and len(fused) == len(sources):
            _replace(model, name, nn.Identity())
        elif fused and type(model.get_submodule(name)) is nn.ReLU:
            _replace(model, name, SharedReLU(inplace=model.get_submodule(name).inplace))
            for s in fused:
                model.get_submodule(s).marks_output = True
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


__all__ = ["SharedReLU", "fuse_bn_relu"]
