"""Note [a failed step changes nothing] (DESIGN.md, Safety): every check of a step runs before its
first write, so a step that raises has written nothing but the state it created for the first time
(lazily, as torch does: ``step``, the moments, ``master_param``); that state is removed again, and
the plan is dropped, so that the optimizer is as it was before the call."""

from __future__ import annotations

from torch import Tensor


def undo_created(state: dict, created: list[tuple[Tensor, str]]) -> None:
    """Remove the (param, state key) entries a failed step created, and a param's state dict
    that is left empty."""
    for p, key in created:
        entries = state.get(p)
        if entries is not None:
            entries.pop(key, None)
            if not entries:
                del state[p]
