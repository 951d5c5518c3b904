"""Bad input: torch's validation errors, clear errors for what fastopt refuses, no corruption."""

from __future__ import annotations

import math

import pytest
import torch

import fastopt
from specs import NAMES, clone_params, make_params

# (optimizer, bad kwargs): torch raises for each; fastopt must raise the same type and message.
TORCH_VALIDATION = [
    ("Adam", {"lr": -1.0}), ("Adam", {"eps": -1.0}), ("Adam", {"betas": (1.0, 0.9)}),
    ("Adam", {"betas": (0.9, -0.1)}), ("Adam", {"weight_decay": -1.0}),
    ("Adam", {"betas": (torch.tensor(0.9), 0.99)}), ("Adam", {"lr": torch.tensor([0.1, 0.2])}),
    ("AdamW", {"lr": -1.0}), ("AdamW", {"betas": (0.9, 1.5)}),
    ("Adagrad", {"lr": -1.0}), ("Adagrad", {"lr_decay": -1.0}), ("Adagrad", {"weight_decay": -1.0}),
    ("Adagrad", {"initial_accumulator_value": -1.0}), ("Adagrad", {"eps": -1.0}),
    ("RMSprop", {"lr": -1.0}), ("RMSprop", {"eps": -1.0}), ("RMSprop", {"momentum": -1.0}),
    ("RMSprop", {"weight_decay": -1.0}), ("RMSprop", {"alpha": -1.0}),
    ("SGD", {"lr": -1.0}), ("SGD", {"momentum": -0.5}), ("SGD", {"weight_decay": -1.0}),
    ("SGD", {"nesterov": True}), ("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}),
    ("SGD", {"lr": torch.tensor([0.1, 0.2])}), ("SGD", {"fused": True, "foreach": True}),
    ("Adam", {"fused": True, "foreach": True}),
]


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - we compare whatever torch raises
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("name,kwargs", TORCH_VALIDATION, ids=lambda v: str(v))
def test_same_validation_errors_as_torch(name, kwargs):
    p = [torch.nn.Parameter(torch.zeros(3))]
    expected = _error(lambda: getattr(torch.optim, name)(p, **kwargs))
    assert expected is not None, "torch accepted it: the case is wrong"
    assert _error(lambda: getattr(fastopt, name)(p, **kwargs)) == expected


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"differentiable": True}, NotImplementedError, "differentiable=True"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": math.inf}, ValueError, "max_grad_norm"),
        ({"norm_type": 1.0}, ValueError, "norm_type"),
        ({"clip_value": -0.5}, ValueError, "clip_value"),
        ({"master_weights": "yes"}, TypeError, "master_weights"),
        ({"backend": "fast"}, ValueError, "backend"),
        ({"no_such_option": 1}, TypeError, "unexpected keyword argument 'no_such_option'"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_fastopt_extras_are_validated(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(fastopt, name)([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_unavailable_backend_says_why():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(fastopt.BackendUnavailable, match="backend='cuda' cannot run on cpu tensors"):
        fastopt.Adam(p, backend="cuda")


def test_duplicate_params_are_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="duplicate parameters"):
        fastopt.Adam([p, p])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        fastopt.Adam([{"params": [p]}, {"params": [p]}])


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_sparse_grads_are_refused_like_torch(name):
    def run(module):
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = getattr(module, name)(emb.parameters())
        emb(torch.tensor([1, 2])).sum().backward()
        before = emb.weight.detach().clone()
        err = _error(opt.step)
        assert torch.equal(emb.weight.detach(), before)
        assert len(opt.state) == 0  # refused before any state was created
        return err

    theirs, ours = run(torch.optim), run(fastopt)
    assert theirs is not None and ours == theirs


@pytest.mark.parametrize("kwargs", [{}, {"maximize": True}, {"lr": torch.tensor(0.05)}],
                         ids=["default", "maximize", "tensor-lr"])
def test_sparse_sgd_matches_torch(kwargs):
    """SGD without momentum takes sparse grads, as torch does (an embedding and a dense layer)."""
    torch.manual_seed(0)
    kwargs = {"lr": 0.1, **kwargs}
    models = []
    for module in (torch.optim, fastopt):
        torch.manual_seed(0)
        emb, lin = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 1)
        models.append((emb, lin, getattr(module, "SGD")([*emb.parameters(), *lin.parameters()], **kwargs)))
    for step in range(5):
        idx = torch.randint(0, 10, (6,))
        for emb, lin, opt in models:
            opt.zero_grad()
            lin(emb(idx)).pow(2).sum().backward()
            opt.step()
    (emb_t, lin_t, opt_t), (emb_f, lin_f, opt_f) = models
    assert emb_f.weight.grad.is_sparse
    # The dense layer steps on the cpu kernels, the sparse rows by torch's own add_(alpha=-lr):
    # torch's bits where both fuse the multiply-add alike (Note [torch's fused multiply-adds]);
    # else the dense update rounds once differently per step (an ulp, ~1e-7 relative) and the
    # embedding's grads, which flow through that layer, carry it on: over 5 steps of well-scaled
    # fp32 values that stays within TOL's fp32 bound (rtol 1e-5, atol 1e-6).
    same_fusion = (torch.backends.cpu.get_cpu_capability() != "DEFAULT") == (fastopt.cpu_capability() != "default")
    tol = dict(rtol=0, atol=0) if same_fusion else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb_f.weight, emb_t.weight, **tol)
    torch.testing.assert_close(lin_f.weight, lin_t.weight, **tol)
    torch.testing.assert_close(lin_f.bias, lin_t.bias, **tol)
    assert opt_f.step_stats.kernel == 2 and opt_f.step_stats.reference == 1  # the dense ones on the kernels
    assert opt_f.state_dict()["state"] == opt_t.state_dict()["state"] == {}


@pytest.mark.parametrize("name,kwargs,exc,match", [
    ("SGD", {"momentum": 0.9}, NotImplementedError, "without momentum"),
    # torch.optim.SGD fails on it too, mid-step: "add(sparse, dense) is not supported"
    ("SGD", {"weight_decay": 0.1}, RuntimeError, "weight_decay is not compatible with sparse gradients"),
    ("Adagrad", {"weight_decay": 0.1}, RuntimeError, "weight_decay option is not compatible with sparse gradients"),
])
def test_a_refused_sparse_grad_writes_nothing(name, kwargs, exc, match):
    """A sparse grad the class cannot step is refused when the step is planned: the dense params
    of the same step are not updated, no state is left behind."""
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 1)
    opt = getattr(fastopt, name)([*lin.parameters(), *emb.parameters()], lr=0.1, **kwargs)
    state_before = {p: dict(s) for p, s in opt.state.items()}
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (*lin.parameters(), *emb.parameters())]
    with pytest.raises(exc, match=match):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip((*lin.parameters(), *emb.parameters()), before))
    assert {p: sorted(s) for p, s in opt.state.items()} == {p: sorted(s) for p, s in state_before.items()}


def test_sparse_adagrad_matches_torch():
    torch.manual_seed(0)
    emb_t = torch.nn.Embedding(10, 3, sparse=True)
    emb_f = torch.nn.Embedding(10, 3, sparse=True)
    emb_f.load_state_dict(emb_t.state_dict())
    opt_t = torch.optim.Adagrad(emb_t.parameters(), lr=0.1, lr_decay=0.01)
    opt_f = fastopt.Adagrad(emb_f.parameters(), lr=0.1, lr_decay=0.01)
    for _ in range(5):
        idx = torch.randint(0, 10, (6,))
        for emb, opt in ((emb_t, opt_t), (emb_f, opt_f)):
            opt.zero_grad()
            emb(idx).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(emb_f.weight, emb_t.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt_f.state[emb_f.weight]["sum"], opt_t.state[emb_t.weight]["sum"])
    with pytest.raises(NotImplementedError, match="sparse gradients cannot be combined"):
        opt = fastopt.Adagrad(emb_f.parameters(), max_grad_norm=1.0)
        emb_f(torch.tensor([1])).sum().backward()
        opt.step()


def test_non_leaf_param_is_refused_like_torch():
    x = torch.randn(3, requires_grad=True) * 2
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        fastopt.Adam([x])


def test_step_without_grads_is_a_no_op():
    params = clone_params(make_params(torch.float32, "cpu"))
    opt = fastopt.Adam(params, max_grad_norm=1.0)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert len(opt.state) == 0


def _grad_error(backend: str, grad: torch.Tensor) -> str:
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = fastopt.Adam([torch.nn.Parameter(torch.zeros(2)), p], backend=backend)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    p.grad = torch.ones(4, 3)
    p.grad.data = grad  # as test_failed_step: autograd's own check stops a plain assignment
    with pytest.raises(RuntimeError) as info:
        opt.step()
    assert torch.equal(p, torch.zeros(4, 3)), "the refused step wrote the param"
    return str(info.value).splitlines()[0].replace(f"fastopt ({backend})", "fastopt (B)")


@pytest.mark.parametrize("grad,expected", [
    (torch.ones(4, 3, dtype=torch.float64),
     "fastopt (B): expected the grad of param 1 to have dtype Float (the param's), but got Double"),
    (torch.ones(3, 4), "fastopt (B): the grad of param 1 has shape [3, 4], the param [4, 3]"),
], ids=["dtype", "shape"])
def test_one_grad_check_on_every_path(grad, expected, monkeypatch):
    """Note [one grad check]: the reference rules (no plan), the planned backends' binding and the
    Python twin used without the extension refuse a bad grad with the same words; with the
    extension the reference rules' check is the C++ one (monkeypatched away, the Python twin must
    take over and say the same)."""
    from conftest import backend_params
    from fastopt import _ext

    runnable = [b.values[0] for b in backend_params() if not b.marks]
    assert "reference" in runnable
    for backend in runnable:
        assert _grad_error(backend, grad) == expected, backend
    if _ext.has_cpu_ops():
        calls = []
        real = _ext._C.check_grads
        monkeypatch.setattr(_ext._C, "check_grads", lambda *a: calls.append(a) or real(*a))
        _grad_error("reference", grad)
        assert len(calls) == 1, "the reference rules did not check through the extension"
        monkeypatch.setattr(_ext, "has_cpu_ops", lambda: False)
        assert _grad_error("reference", grad) == expected
        assert len(calls) == 1, "the Python twin called the extension"
