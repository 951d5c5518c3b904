"""fastopt.nn BatchNorm+ReLU against torch's BatchNormNd -> ReLU on every backend: outputs, input /
weight / bias gradients, running statistics and num_batches_tracked over several steps."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import fastopt
from conftest import assert_close
from fastopt.nn import BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d
from fastopt.nn.functional import batch_norm_relu, resolve

TORCH_BN = {BatchNormReLU1d: nn.BatchNorm1d, BatchNormReLU2d: nn.BatchNorm2d, BatchNormReLU3d: nn.BatchNorm3d}

# (fused class, input shape, channels_last): 1d/2d/3d, odd sizes, one sample, 1x1 spatial.
SHAPES = [
    (BatchNormReLU1d, (7, 3), False),
    (BatchNormReLU1d, (4, 5, 9), False),
    (BatchNormReLU2d, (2, 3, 5, 7), False),
    (BatchNormReLU2d, (2, 3, 5, 7), True),
    (BatchNormReLU2d, (1, 6, 3, 3), True),
    (BatchNormReLU2d, (5, 17, 1, 1), False),
    (BatchNormReLU3d, (2, 3, 2, 3, 5), False),
    (BatchNormReLU3d, (2, 3, 2, 3, 5), True),
]
FLAGS = [
    {},
    {"affine": False},
    {"track_running_stats": False},
    {"momentum": None},
    {"affine": False, "track_running_stats": False},
    {"eps": 1e-3, "momentum": 0.3},
]
# Note [BatchNorm+ReLU tolerances]: the per-channel sums run over up to ~10^2 values in another
# order than torch's (shifted sums, float within a row, double across), so fp32 results differ
# by a few ulps of the largest terms; fp64 by a few ulps of fp64.
TOL = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


def _input(shape, channels_last, dtype, device, *, offset=3.0):
    x = torch.randn(shape, dtype=torch.float64) * 2 + offset  # |mean| > std: tests the shifted sums
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _pair(cls, channels, flags, dtype, device, backend):
    ours = cls(channels, backend=backend, **flags).to(device=device, dtype=dtype)
    theirs = TORCH_BN[cls](channels, **flags).to(device=device, dtype=dtype)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if ours.bias is not None:
                ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _compare_modules(ours, theirs, tol, what):
    for name, buf in theirs.named_buffers():
        mine = dict(ours.named_buffers())[name]
        if name == "num_batches_tracked":
            assert int(mine) == int(buf), f"{what}: num_batches_tracked {int(mine)} != {int(buf)}"
        else:
            assert_close(mine, buf, **tol, what=f"{what} {name}")
    for name, p in theirs.named_parameters():
        assert_close(dict(ours.named_parameters())[name].grad, p.grad, **tol, what=f"{what} grad of {name}")


@pytest.mark.parametrize("cls,shape,channels_last", SHAPES, ids=lambda v: str(v) if not isinstance(v, type) else v.__name__)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torch(backend, device, cls, shape, channels_last, flags, dtype):
    tol = TOL[dtype]
    ours, theirs = _pair(cls, shape[1], flags, dtype, device, backend)
    for step, mode in enumerate(["train", "train", "train", "eval", "train"]):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        ours.zero_grad()
        theirs.zero_grad()
        x = _input(shape, channels_last, dtype, device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), torch.relu(theirs(xb))
        what = f"step {step} ({mode})"
        assert_close(ya, yb, **tol, what=f"{what} output")
        assert ya.stride() == yb.stride(), f"{what}: output strides {ya.stride()} != torch's {yb.stride()}"
        dy = torch.randn_like(yb)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(xa.grad, xb.grad, **tol, what=f"{what} grad of x")
        _compare_modules(ours, theirs, tol, what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 8, 9, 11), (4, 16, 8, 8)], ids=["odd", "packs"])
def test_low_precision_error_within_twice_torchs(backend, device, dtype, channels_last, shape):
    """bf16/fp16 inputs (fp32 weight, bias and statistics): the error against an fp64 computation is
    at most ~2x that of torch's own low-precision BatchNorm2d -> ReLU (STYLE: flash-attention's rule).
    "packs": H*W and C multiples of 8, the CUDA kernels' 16-byte path in both layouts (Note [16-byte
    packs], csrc/cuda/batch_norm_relu.cu); "odd": 9x11 NCHW takes the one-value path."""
    ours, exact = _pair(BatchNormReLU2d, shape[1], {}, torch.float32, device, backend)
    low = nn.BatchNorm2d(shape[1]).to(device)
    low.load_state_dict(exact.state_dict())
    exact = exact.double()
    x = _input(shape, channels_last, dtype, device, offset=0.5)
    dy = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    results = {}
    for name, fn, inp in [("exact", lambda t: torch.relu(exact(t)), x.double()),
                          ("torch", lambda t: torch.relu(low(t)), x.clone()),
                          ("ours", ours, x.clone())]:
        inp = inp.requires_grad_()
        y = fn(inp)
        y.backward(dy.to(y.dtype))
        results[name] = (y.double(), inp.grad.double())
    for i, what in enumerate(["output", "grad of x"]):
        ref = results["exact"][i]
        err_torch = (results["torch"][i] - ref).abs().max().item()
        err_ours = (results["ours"][i] - ref).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-6, f"{what}: error {err_ours:.3g} > 2 x torch's {err_torch:.3g}"
    assert_close(ours.running_mean, exact.running_mean.float(), rtol=1e-3, atol=1e-3, what="running_mean")
    assert_close(ours.running_var, exact.running_var.float(), rtol=1e-3, atol=1e-3, what="running_var")


# (shape, channels_last, misaligned): the CUDA kernels' 16-byte path (H*W, or C in channels_last, a
# multiple of the pack: 4 fp32, 2 fp64 values) with several packs per thread and several blocks per
# channel, and the same shapes with x starting one element past a 16-byte boundary (the one-value
# path: Note [16-byte packs]).
PACK_CASES = [((6, 8, 16, 16), False, False), ((6, 32, 12, 12), True, False), ((2, 4, 4, 4), False, True),
              ((6, 32, 12, 12), True, True)]


@pytest.mark.parametrize("shape,channels_last,misaligned", PACK_CASES,
                         ids=["nchw", "channels_last", "nchw-misaligned", "channels_last-misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pack_paths_match_torch(backend, device, shape, channels_last, misaligned, dtype):
    tol = TOL[dtype]
    ours, theirs = _pair(BatchNormReLU2d, shape[1], {}, dtype, device, backend)
    x = _input(shape, channels_last, dtype, device)
    if misaligned:
        flat = torch.empty(x.numel() + 1, dtype=dtype, device=device)
        perm = x.permute(0, 2, 3, 1) if channels_last else x
        flat[1:].view(perm.shape).copy_(perm)
        x = flat[1:].view(perm.shape)
        x = x.permute(0, 3, 1, 2) if channels_last else x
        assert x.data_ptr() % 16 != 0 and x.is_contiguous(memory_format=torch.channels_last if channels_last
                                                          else torch.contiguous_format)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        ours.zero_grad()
        theirs.zero_grad()
        xa, xb = x.detach().requires_grad_(), x.detach().clone().requires_grad_()
        ya, yb = ours(xa), torch.relu(theirs(xb))
        assert_close(ya, yb, **tol, what=f"{mode} output")
        dy = torch.randn_like(yb)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(xa.grad, xb.grad, **tol, what=f"{mode} grad of x")
        _compare_modules(ours, theirs, tol, mode)


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_float64(backend, device, training, channels_last):
    x = _input((3, 4, 2, 3), channels_last, torch.float64, device, offset=0.0).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = (torch.rand(4, dtype=torch.float64, device=device) - 0.5).requires_grad_()
    rm = torch.randn(4, dtype=torch.float64, device=device)
    rv = torch.rand(4, dtype=torch.float64, device=device) + 0.5

    def fn(x, w, b):  # running statistics: fresh copies, so every evaluation sees the same ones
        return batch_norm_relu(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_backward_without_input_grad(backend, device):
    """A frozen first layer: no grad for x, grads for weight and bias still right."""
    ours, theirs = _pair(BatchNormReLU2d, 3, {}, torch.float32, device, backend)
    x = _input((2, 3, 4, 4), False, torch.float32, device)
    ours(x).sum().backward()
    torch.relu(theirs(x)).sum().backward()
    _compare_modules(ours, theirs, TOL[torch.float32], "no input grad")


def test_empty_batch_in_eval(backend, device):
    ours, theirs = _pair(BatchNormReLU2d, 3, {}, torch.float32, device, backend)
    ours.eval()
    y = ours(torch.empty(0, 3, 4, 4, device=device))
    assert y.shape == (0, 3, 4, 4)


def test_one_value_per_channel_raises_and_changes_nothing(backend, device):
    m = BatchNormReLU2d(3, backend=backend).to(device)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1, 3, 1, 1, device=device))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected batch"
    m.eval()
    assert m(torch.randn(1, 3, 1, 1, device=device)).shape == (1, 3, 1, 1)  # fine in eval, as torch


def test_wrong_channel_count_names_the_problem(backend, device):
    m = BatchNormReLU2d(4, backend=backend).to(device)
    with pytest.raises(ValueError, match=r"input has 3 channels .* expected 4"):
        m(torch.randn(2, 3, 5, 5, device=device))
    bare = BatchNormReLU2d(4, affine=False, track_running_stats=False, backend=backend)
    with pytest.raises(ValueError, match="input has 3 channels"):
        bare(torch.randn(2, 3, 5, 5, device=device))
    with pytest.raises(ValueError, match="running_mean has 4 elements"):
        batch_norm_relu(torch.randn(2, 3, 5, device=device), torch.zeros(4, device=device),
                        torch.ones(4, device=device), training=True, backend=backend)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        m(torch.randn(2, 4, 5, device=device))


def test_non_contiguous_input(backend, device):
    ours, theirs = _pair(BatchNormReLU2d, 5, {}, torch.float32, device, backend)
    x = torch.randn(3, 7, 5, 4, device=device).permute(0, 2, 3, 1)[:, :, ::2]  # (3, 5, 2, 4), strided
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert_close(ours(x), torch.relu(theirs(x)), **TOL[torch.float32], what="strided input")


@pytest.mark.parametrize("cls", [BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d], ids=lambda c: c.__name__)
def test_state_dict_is_batchnorms(cls):
    ours, theirs = cls(6), TORCH_BN[cls](6)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        theirs.weight.uniform_()
        theirs.running_var.uniform_(1, 2)
    theirs.num_batches_tracked.fill_(7)
    ours.load_state_dict(theirs.state_dict())
    back = TORCH_BN[cls](6)
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_resolve_picks_a_backend_per_dtype():
    assert resolve("auto", torch.device("cpu"), torch.float32).name in ("cpu", "reference")



def test_auto_never_picks_triton_on_a_gpu(monkeypatch):
    """Note [no triton under auto] (fastopt/nn/functional.py): with every backend available but the
    cuda one (an extension built without CUDA), auto takes the reference implementation."""
    from fastopt.nn import functional

    monkeypatch.setattr(functional._backends, "why_unavailable", lambda name, device: "no" if name == "cuda" else None)
    monkeypatch.setattr(functional, "_RESOLVED", {})
    assert resolve("auto", torch.device("cuda"), torch.float32).name == "reference"
    assert resolve("triton", torch.device("cuda"), torch.float32).name == "triton"
    with pytest.raises(fastopt.BackendUnavailable, match="cuda"):
        resolve("cuda", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        BatchNormReLU2d(3, backend="fast")


def test_cumulative_momentum_matches_torch():
    ours, theirs = _pair(BatchNormReLU2d, 3, {"momentum": None}, torch.float64, "cpu", "auto")
    for _ in range(4):
        x = _input((3, 3, 4, 4), False, torch.float64, "cpu")
        ours(x)
        theirs(x)
    assert_close(ours.running_var, theirs.running_var, **TOL[torch.float64], what="running_var")
    assert int(ours.num_batches_tracked) == 4


def test_sizes_beyond_one_tile(backend, device):
    """More values per channel than one program's tile and split (exercises the loops)."""
    ours, theirs = _pair(BatchNormReLU2d, 3, {}, torch.float32, device, backend)
    for cl in (False, True):
        x = _input((5, 3, 37, 41), cl, torch.float32, device).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        dy = torch.randn_like(x)
        ours(x).backward(dy)
        torch.relu(theirs(x2)).backward(dy)
        assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4, what=f"grad of x (channels_last={cl})")
    assert_close(ours.running_var, theirs.running_var, **TOL[torch.float32], what="running_var")


def test_low_precision_module(backend, device):
    """A module converted with .to(bfloat16) (bf16 weight, bias and running statistics) computes in
    float32 and writes its bf16 state back; grads reach the bf16 parameters."""
    m = BatchNormReLU2d(4, backend=backend).to(device=device, dtype=torch.bfloat16)
    exact = nn.BatchNorm2d(4).to(device=device, dtype=torch.float64)
    x = _input((3, 4, 5, 5), False, torch.bfloat16, device)
    m(x).float().sum().backward()
    torch.relu(exact(x.double())).sum().backward()
    assert m.weight.dtype == m.running_var.dtype == m.weight.grad.dtype == torch.bfloat16
    # bf16 storage of O(1) values: 2^-8 relative rounding, plus the sum of 75 rounded grads
    assert_close(m.running_var.double(), exact.running_var, rtol=1e-2, atol=1e-2, what="running_var")
    assert_close(m.weight.grad.double(), exact.weight.grad, rtol=2e-2, atol=5e-2, what="grad of weight")


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_torch_compile(backend_name):
    if fastopt.backends.why_unavailable(backend_name, "cpu"):
        pytest.skip(f"{backend_name} unavailable")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormReLU2d(4, backend=backend_name))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    plain[0].load_state_dict(model[0].state_dict())
    x = torch.randn(2, 3, 8, 8)
    ya = torch.compile(model)(x)
    yb = plain(x)
    ya.sum().backward()
    yb.sum().backward()
    tol = TOL[torch.float32]
    assert_close(ya, yb, **tol, what="compiled output")
    assert_close(model[0].weight.grad, plain[0].weight.grad, **tol, what="compiled conv weight grad")
    assert_close(model[1].running_var, plain[1].running_var, **tol, what="compiled running_var")
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.skipif("bias" not in __import__("inspect").signature(nn.BatchNorm2d.__init__).parameters,
                    reason="this torch's BatchNorm has no bias argument")
def test_weight_without_bias(backend, device):
    """BatchNorm2d(bias=False) (torch >= 2.13): same keys, same results, and fuse_bn_relu keeps it so."""
    ours, theirs = _pair(BatchNormReLU2d, 3, {"bias": False}, torch.float32, device, backend)
    assert list(ours.state_dict()) == list(theirs.state_dict()) and ours.bias is None
    x = _input((2, 3, 4, 5), False, torch.float32, device).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ours(x).sum().backward()
    torch.relu(theirs(x2)).sum().backward()
    assert_close(x.grad, x2.grad, **TOL[torch.float32], what="grad of x")
    _compare_modules(ours, theirs, TOL[torch.float32], "bias=False")
    fused = fastopt.nn.fuse_bn_relu(nn.Sequential(nn.BatchNorm2d(3, bias=False), nn.ReLU()))
    assert isinstance(fused[0], BatchNormReLU2d) and fused[0].bias is None
    assert list(fused.state_dict()) == ["0.weight", "0.running_mean", "0.running_var", "0.num_batches_tracked"]


def test_double_backward_raises(backend, device):
    """create_graph=True works; differentiating the gradients again raises (no silent constant)."""
    m = BatchNormReLU2d(3, backend=backend).to(device)
    x = _input((2, 3, 4, 4), False, torch.float32, device).requires_grad_()
    (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once differentiable|differentiate twice"):
        (g * x).sum().backward()


# The torch ops the Triton path may run: allocations and the counters' zero-fill (Note [last
# program finalizes], triton_kernels/batch_norm_relu.py). Statistics, coefficients and running
# statistics are computed in the kernels.
_ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_like.default", "aten.new_empty.default",
                "aten.zeros.default", "aten.zero_.default", "aten.fill_.Scalar", "aten.empty_strided.default"}


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_two_launches_per_direction_and_no_torch_math(backend, device, training, channels_last, monkeypatch):
    """Forward and backward are two kernel launches each (one in eval forward), with the statistics
    finalized in the kernel: no torch op on the path but allocations; results still torch's."""
    if backend != "triton":
        pytest.skip("the launch structure of the Triton kernels")
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    mod = fastopt.backends.triton.kernels().batch_norm_relu
    launches = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append((self.kernel.fn.__name__, tuple(grid)))
            launch = self.kernel[grid]

            def run(*args, **kwargs):  # the interpreter's own copies are not the host path's ops
                with _disable_current_modes():
                    return launch(*args, **kwargs)

            return run

    for name in ("_bn_relu_sums_kernel", "_bn_relu_apply_kernel"):
        monkeypatch.setattr(mod, name, Counted(getattr(mod, name)))

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    ours, theirs = _pair(BatchNormReLU2d, 5, {}, torch.float32, device, backend)
    ours.train(training)
    theirs.train(training)
    x = _input((3, 5, 6, 7), channels_last, torch.float32, device)
    w, b = ours.weight.detach(), ours.bias.detach()
    rm, rv = ours.running_mean, ours.running_var
    with Ops() as ops:
        y, mean, invstd = mod.bn_relu_forward(x, w, b, rm, rv, training, 0.1, 1e-5)
    assert [n for n, _ in launches] == (["_bn_relu_sums_kernel"] if training else []) + ["_bn_relu_apply_kernel"]
    assert set(ops.seen) <= _ALLOCATIONS, sorted(set(ops.seen) - _ALLOCATIONS)
    launches.clear()
    dy = torch.randn_like(x)
    with Ops() as ops:
        dx, dw, db = mod.bn_relu_backward(dy, x, w, b, mean, invstd, training, True)
    assert [n for n, _ in launches] == ["_bn_relu_sums_kernel", "_bn_relu_apply_kernel"]
    assert set(ops.seen) <= _ALLOCATIONS, sorted(set(ops.seen) - _ALLOCATIONS)

    x2 = x.clone().requires_grad_()
    ref = torch.relu(theirs(x2))
    ref.backward(dy)
    assert_close(y, ref.detach(), **TOL[torch.float32], what="output")
    assert_close(dx, x2.grad, **TOL[torch.float32], what="grad of x")
    assert_close(dw, theirs.weight.grad, **TOL[torch.float32], what="grad of weight")
    assert_close(db, theirs.bias.grad, **TOL[torch.float32], what="grad of bias")
    assert_close(rm, theirs.running_mean, **TOL[torch.float32], what="running_mean")
    assert_close(rv, theirs.running_var, **TOL[torch.float32], what="running_var")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("shape,channels_last,dtype", [
    ((4, 64, 14, 14), False, torch.float32), ((4, 64, 14, 14), False, torch.bfloat16),
    ((4, 64, 7, 7), True, torch.bfloat16), ((3, 20, 5, 5), True, torch.bfloat16)])
def test_cuda_two_kernels_per_direction(shape, channels_last, dtype, training):
    """The CUDA op: two kernels forward (the reduction finalizes in its last block; eval: a per-channel
    kernel) and two backward, on the 16-byte and the one-value paths; the counters' memset is not a
    kernel. Results checked against torch (bf16 within 2x torch's own error is the job of
    test_low_precision_error_within_twice_torchs; here a bf16 step of the output)."""
    from torch.profiler import ProfilerActivity, profile

    c = shape[1]
    ours, theirs = _pair(BatchNormReLU2d, c, {}, torch.float32, "cuda", "cuda")
    x = _input(shape, channels_last, dtype, "cuda")
    w, b, rm, rv = ours.weight.detach(), ours.bias.detach(), ours.running_mean, ours.running_var
    dy = torch.randn_like(x)

    def kernels(fn):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                 and "memset" not in e.name.lower() and "memcpy" not in e.name.lower()]
        return out, names

    (y, mean, invstd), fwd = kernels(lambda: torch.ops.fastopt.bn_relu_forward(x, w, b, rm, rv, training, 0.1, 1e-5))
    (dx, dw, db), bwd = kernels(lambda: torch.ops.fastopt.bn_relu_backward(dy, x, w, b, mean, invstd, training, True))
    assert len(fwd) == 2, fwd
    assert len(bwd) == 2, bwd
    theirs.train(training)
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", enabled=False):
        ref = torch.relu(theirs(x2.float()))
    ref.backward(dy.float())
    low = dtype != torch.float32
    tol = dict(rtol=1e-2, atol=1e-2) if low else TOL[torch.float32]  # bf16: about one bf16 step (2^-8)
    assert_close(y.float(), ref.detach(), **tol, what="output")
    assert_close(dx.float(), x2.grad, **tol, what="grad of x")
    assert_close(dw, theirs.weight.grad, **(dict(rtol=1e-2, atol=1e-1) if low else TOL[torch.float32]), what="dweight")
    assert_close(rm, theirs.running_mean, **TOL[torch.float32], what="running_mean")
