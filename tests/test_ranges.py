"""Note [adjacent tensors, one range] (csrc/cpu/multi_tensor.h) and Note [ranges on the GPU]
(csrc/include/fastopt/range_table.h): params, grads and state that lie back to back (views of one
buffer, the state buffer) are walked by the kernels of every planned backend as one range. The
update is elementwise, so the results are bit for bit those of the same tensors apart."""

from __future__ import annotations

import pytest
import torch

import fastopt

from conftest import backend_device, backend_params
from harness import assert_matches, set_grads
from specs import NAMES, SPEC_BY_NAME, clone_params

# multiples of 16 bytes of float32, so that the state buffer (16-byte aligned) is packed as the
# params are; an empty param splits the range
SIZES = [4, 100, 0, 36, 12, 64]


def _update_chunks(opt):
    return [sp.plan.update_chunks for b in opt._run.plan.buckets for sp in b.run.plans]


def _grads(step, device):
    """Grads of step ``step``: all (1), param 4's absent (2), all (3: param 4's step count is now
    one behind its neighbours'), param 1's with a storage of its own (4), all (5: param 4's step
    count written by hand before it)."""
    torch.manual_seed(step)
    grads = list(torch.randn(sum(SIZES), device=device).split(SIZES))
    if step == 2:
        grads[4] = None
    return grads


# The ranges the kernels walk in each step. The CPU's: {0, 1} {3, 4, 5}; {0, 1} {3} {4} {5}; the
# same, as param 4's step count differs; {0} {1} {3} {4} {5}; {0, 1} {3} {4} {5} (the empty param
# takes no chunk; an absent grad's tensor keeps one, skipped). The GPU plans' (Triton, CUDA) follow
# the addresses alone, and every tensor, the empty one too, has a chunk (its step count): {0, 1}
# {2} {3, 4, 5}; {0, 1} {2} {3} {4} {5}; {0, 1} {2} {3, 4, 5} (the kernels find param 4's count
# differs and walk that chunk tensor by tensor); {0} {1} {2} {3, 4, 5}; as step 3.
EXPECTED_CHUNKS = {"cpu": {1: 2, 2: 4, 3: 4, 4: 5, 5: 4}, "gpu": {1: 3, 2: 5, 3: 3, 4: 4, 5: 3}}


@pytest.mark.parametrize("extras", [{}, {"state_dtype": torch.bfloat16}], ids=["fp32", "bf16 state"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "reference"])
def test_adjacent_tensors_are_one_range(backend, name, extras):
    spec = SPEC_BY_NAME[name]
    device = backend_device(backend)
    flat = torch.randn(sum(SIZES), device=device)
    together = [torch.nn.Parameter(v) for v in flat.clone().split(SIZES)]  # views of one buffer
    apart = clone_params(together)
    theirs = clone_params(together)
    make = lambda params: spec.fastopt_cls(params, backend=backend, lr=spec.lr, **spec.stateful, **extras)
    opt_together, opt_apart = make(together), make(apart)
    opt_t = spec.torch_cls(theirs, foreach=False, lr=spec.lr, **spec.stateful)
    expected = EXPECTED_CHUNKS["cpu" if backend == "cpu" else "gpu"]
    apart_chunks = len(SIZES) - (backend == "cpu")  # the CPU's empty param takes no chunk
    for step in (1, 2, 3, 4, 5):
        grads = _grads(step, device)
        buffer = torch.cat([g for g in grads if g is not None])
        views = iter(buffer.split([s for s, g in zip(SIZES, grads) if g is not None]))
        for p, g in zip(together, grads):
            p.grad = None if g is None else next(views)
        if step == 4:
            together[1].grad = grads[1].clone()
        if step == 5 and "step" in opt_t.state[theirs[4]]:  # a count written by hand, alike in each
            for opt, params in ((opt_together, together), (opt_apart, apart), (opt_t, theirs)):
                opt.state[params[4]]["step"].fill_(10.0)
        set_grads(apart, grads)
        set_grads(theirs, grads)
        for opt in (opt_together, opt_apart, opt_t):
            opt.step()
        assert opt_together.step_stats.kernel == sum(g is not None for g in grads)
        assert opt_together.step_stats.reference == 0, opt_together.step_stats
        # stochastic rounding is keyed by the element's index in its own tensor: never joined
        joined = expected[step] if not extras else apart_chunks
        assert _update_chunks(opt_together) == [joined], f"step {step}"
        assert _update_chunks(opt_apart) == [apart_chunks], f"step {step}"
        for p, q in zip(together, apart):
            assert torch.equal(p, q), f"step {step}: a param differs from its twin apart"
            for key, value in opt_apart.state[q].items():
                assert torch.equal(opt_together.state[p][key], value), f"step {step}: {key} differs"
    if not extras:
        assert_matches(opt_together, opt_t, together, theirs, torch.float32)


# tensors larger and smaller than a chunk (16,384 elements on the GPU plans, 32,768 on the CPU),
# so that chunks begin and end inside tensors and a tensor is covered by several chunks
LONG_SIZES = [10_000, 20_000, 3, 16_381, 40_000, 7]
# more tiny tensors than a GPU plan's chunk covers (RangeTable::kMaxTensors, 64): chunks cut early
TINY_SIZES = [1] * 150 + [3, 20_000]


@pytest.mark.parametrize("sizes", [LONG_SIZES, TINY_SIZES], ids=["long", "tiny"])
@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "reference"])
def test_a_range_of_several_chunks(backend, sizes):
    """Adam over views of one buffer in two param groups, whose ranges span several chunks: bit for
    bit the same tensors apart, each step, and as torch; param 2's grad is absent in step 2, so in step 3 the chunks that cover it
    hold tensors of two step counts (walked tensor by tensor), and every count is stored once."""
    spec = SPEC_BY_NAME["Adam"]
    device = backend_device(backend)
    together = [torch.nn.Parameter(v) for v in torch.randn(sum(sizes), device=device).split(sizes)]
    apart = clone_params(together)
    theirs = clone_params(together)

    def groups(params):  # two param groups over the one buffer: a range never crosses a group
        cut = len(params) // 2
        return [{"params": params[:cut]}, {"params": params[cut:], "lr": spec.lr / 2}]

    make = lambda params: spec.fastopt_cls(groups(params), backend=backend, lr=spec.lr, **spec.stateful)
    opt_together, opt_apart = make(together), make(apart)
    opt_t = spec.torch_cls(groups(theirs), foreach=False, lr=spec.lr, **spec.stateful)
    for step in (1, 2, 3):
        torch.manual_seed(step)
        buffer = torch.randn(sum(sizes), device=device)
        grads = list(buffer.split(sizes))
        if step == 2:  # the other grads stay views of the buffer, apart from each other
            grads[2] = None
        for p, g in zip(together, grads):
            p.grad = g
        set_grads(apart, grads)
        set_grads(theirs, grads)
        for opt in (opt_together, opt_apart, opt_t):
            opt.step()
        assert opt_together.step_stats.reference == 0, opt_together.step_stats
        chunks, chunks_apart = sum(_update_chunks(opt_together)), sum(_update_chunks(opt_apart))
        assert chunks < chunks_apart, f"step {step}: {chunks} chunks, not ranges"
        for i, (p, q) in enumerate(zip(together, apart)):
            assert torch.equal(p, q), f"step {step}: param {i} differs from its twin apart"
            for key, value in opt_apart.state[q].items():
                assert torch.equal(opt_together.state[p][key], value), f"step {step}: param {i}'s {key} differs"
    assert_matches(opt_together, opt_t, together, theirs, torch.float32)  # the step counts too


def _check_range_table(table, numels, joins, chunk):
    """The invariants of Note [ranges on the GPU]'s table for tensors of ``numels`` where tensor i
    joins i - 1 when ``joins[i]``."""
    row, n, most = table.row, len(numels), table.max_tensors
    values = table.table().tolist()
    capacity = table.capacity
    rows = [values[c * row:(c + 1) * row] for c in range(table.n_chunks)]
    offsets = values[row * capacity:][0::2]
    covers = values[row * capacity:][1::2]
    assert capacity == sum(max(1, -(-k // chunk)) for k in numels) + n // most
    starts = [t for t in range(n) if t == 0 or not joins[t]]
    walked = []
    for first, last in zip(starts, starts[1:] + [n]):
        total = sum(numels[first:last])
        assert offsets[first:last] == [sum(numels[first:k]) for k in range(first, last)]
        mine = [r for r in rows if r[0] == first]
        # back to back from 0 to the range's end, each chunk `chunk` elements unless it is the last
        # or ends early at its `most`-th tensor
        assert [r[3] for r in mine] == [0] + [r[4] for r in mine[:-1]] and mine[-1][4] == total
        for t0, a, b, lo, hi in mine:  # a to b: exactly the tensors with an element in [lo, hi)
            inside = [k for k in range(first, last) if offsets[k] < hi and lo < offsets[k] + numels[k]]
            assert [a, b] == ([min(inside), max(inside)] if inside else [first, first]), (t0, lo, hi)
            assert b - a < most and (hi - lo == chunk or hi == total or (b - a == most - 1 and hi < lo + chunk))
            if b - a == most - 1 and hi < lo + chunk:
                assert hi == offsets[b] + numels[b]
        walked += mine
    assert len(walked) == len(rows) == table.n_chunks
    assert covers == [sum(r[1] <= t <= r[2] for r in rows) for t in range(n)]
    assert min(covers) >= 1


def test_range_table():
    """fastopt._C.RangeTable (csrc/include/fastopt/range_table.h), the GPU plans' update chunks:
    which tensors join, and its rows, against their definition."""
    ext = fastopt._ext
    if not ext.has_cpu_ops():
        pytest.skip("fastopt._C is not built")
    chunk = 8
    numels = [3, 5, 20, 0, 4, 9, 1, 16]
    address = [1000]
    for i, k in enumerate(numels[:-1]):  # float32 params back to back, but for a gap before tensor 6
        address.append(address[-1] + 4 * k + (4 if i == 5 else 0))
    table = ext._C.RangeTable(numels, [(address, 4)], 4, True, chunk)
    assert table.any_join and table.n_chunks == table.capacity
    _check_range_table(table, numels, [False] * len(numels), chunk)  # apart until a bind
    no_grad = -1
    grads = [2 * a for a in address]  # grads of 8 bytes (float64) do not follow float32 ones
    assert not table.update(torch.tensor(grads))
    grads = [a + 10**6 for a in address]  # back to back as the params are
    assert table.update(torch.tensor(grads))
    # 2 joins 1 and 1 joins 0; the empty 3 joins nothing; 4 and 5 join; 6 after the gap does not
    joins = [False, True, True, False, False, True, False, True]
    _check_range_table(table, numels, joins, chunk)
    assert not table.update(torch.tensor(grads))  # the same grads: no new table
    grads[1] = no_grad
    assert table.update(torch.tensor(grads))
    _check_range_table(table, numels, [False, False, False, False, False, True, False, True], chunk)
    seeded = ext._C.RangeTable(numels, [(address, 4)], 4, False, chunk)  # seeds: never joined
    assert not seeded.any_join and not seeded.update(torch.tensor([a + 10**6 for a in address]))
    # more tiny tensors in one range than a chunk covers, around a long one
    from fastopt.triton_kernels.multi_tensor import RANGE_ROW, RANGE_TENSORS
    assert (table.row, table.max_tensors) == (RANGE_ROW, RANGE_TENSORS)
    numels = [1] * 200 + [50] + [2] * 70
    address = [0]
    for k in numels[:-1]:
        address.append(address[-1] + 8 * k)  # float64 params back to back
    chunk = 128
    table = ext._C.RangeTable(numels, [(address, 8)], 2, True, chunk)  # bfloat16 grads
    assert table.update(torch.tensor([a // 4 + 64 for a in address]))
    _check_range_table(table, numels, [False] + [True] * (len(numels) - 1), chunk)
    assert table.n_chunks > -(-sum(numels) // chunk)  # some cut early


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] == "triton"])
def test_triton_plan_without_the_extension(backend, monkeypatch):
    """Without fastopt._C the Triton plan binds in Python and keeps the per-tensor chunks (Note
    [ranges on the GPU]: the ranges are the extension's): the same results, one chunk per tensor
    apart (a chunk per 16,384 elements of each)."""
    monkeypatch.setattr(fastopt._ext, "has_cpu_ops", lambda: False)
    spec = SPEC_BY_NAME["Adam"]
    device = backend_device(backend)
    together = [torch.nn.Parameter(v) for v in torch.randn(sum(LONG_SIZES), device=device).split(LONG_SIZES)]
    apart = clone_params(together)
    make = lambda params: spec.fastopt_cls(params, backend=backend, lr=spec.lr, **spec.stateful)
    opt_together, opt_apart = make(together), make(apart)
    for step in (1, 2):
        torch.manual_seed(step)
        grads = list(torch.randn(sum(LONG_SIZES), device=device).split(LONG_SIZES))
        for p, g in zip(together, grads):
            p.grad = g
        set_grads(apart, grads)
        opt_together.step()
        opt_apart.step()
        assert opt_together.step_stats.reference == 0, opt_together.step_stats
        assert _update_chunks(opt_together) == [sum(-(-k // 16_384) or 1 for k in LONG_SIZES)]
        for i, (p, q) in enumerate(zip(together, apart)):
            assert torch.equal(p, q), f"step {step}: param {i} differs from its twin apart"
