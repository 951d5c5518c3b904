"""fastopt.nn.fuse_bn_relu on Sequential and ResNet-style forward code, and the SyncBatchNorm guard."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastopt
from conftest import assert_close
from fastopt.nn import BatchNormReLU1d, BatchNormReLU2d, fuse_bn_relu
from fastopt.nn.fuse import SharedReLU

TOL = dict(rtol=1e-4, atol=1e-5)  # Note [BatchNorm+ReLU tolerances] (test_batch_norm_relu.py)


class BasicBlock(nn.Module):
    """torchvision's ResNet block: one ReLU module shared by bn1 and the residual add."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class FunctionalReLU(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn_a, self.bn_b, self.bn_c = nn.BatchNorm2d(c), nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x):
        a = F.relu(self.bn_a(x))
        b = self.bn_b(a).relu()
        c = self.bn_c(b)
        return torch.relu(c) + c  # bn_c also feeds the add: stays a BatchNorm


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.func = FunctionalReLU(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 5), nn.BatchNorm1d(5), nn.ReLU())

    def forward(self, x):
        return self.head(self.func(self.layer1(self.relu(self.bn1(self.conv1(x))))))


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


def test_resnet_style_model():
    model = ResNetish()
    _randomize_bn(model)
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert fuse_bn_relu(model) is model
    fused = {n for n, m in model.named_modules() if isinstance(m, (BatchNormReLU1d, BatchNormReLU2d))}
    assert fused == {"bn1", "layer1.0.bn1", "layer1.1.bn1", "func.bn_a", "func.bn_b", "head.2"}
    # the residual branch's bn2 and bn_c (also read by the add) stay BatchNorm
    assert type(model.layer1[0].bn2) is nn.BatchNorm2d and type(model.func.bn_c) is nn.BatchNorm2d
    # a ReLU module used only after fused BatchNorms goes; the blocks' shared one skips fused outputs
    assert type(model.relu) is nn.Identity and type(model.head[3]) is nn.Identity
    assert type(model.layer1[0].relu) is SharedReLU and model.layer1[0].relu.inplace
    assert model.layer1[0].bn1.marks_output and not model.bn1.marks_output
    assert list(model.state_dict()) == keys

    for mode in ("train", "train", "eval"):
        model.train(mode == "train")
        plain.train(mode == "train")
        x = torch.randn(4, 3, 6, 6)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = model(xa), plain(xb)
        assert_close(ya, yb, **TOL, what=f"{mode} output")
        ya.sum().backward()
        yb.sum().backward()
        assert_close(xa.grad, xb.grad, **TOL, what=f"{mode} grad of x")
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert_close(a.double(), b.double(), **TOL, what=name)

    # the unfused checkpoint loads into the fused model and the other way round
    fresh = fuse_bn_relu(ResNetish())
    fresh.load_state_dict(plain.state_dict())
    ResNetish().load_state_dict(fresh.state_dict())


def test_shares_parameters_with_an_existing_optimizer():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model[1].weight
    fuse_bn_relu(model)
    assert isinstance(model[1], BatchNormReLU2d) and model[1].weight is weight
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    before = weight.detach().clone()
    opt.step()
    assert not torch.equal(weight, before)


def test_untraceable_forward_fuses_children_only():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.relu = nn.ReLU()
            self.inner = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace this module
                x = x * 2
            return self.inner(self.relu(self.bn(x)))

    model = Dynamic()
    fuse_bn_relu(model)
    assert type(model.bn) is nn.BatchNorm2d  # its use is not known
    assert isinstance(model.inner[0], BatchNormReLU2d)
    # kept, as it may have callers the trace did not see; it skips the fused module's output
    assert type(model.inner[1]) is SharedReLU


def test_subclasses_and_sync_batchnorm_are_left_alone():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBN(3), nn.ReLU(), nn.SyncBatchNorm(3), nn.ReLU())
    fuse_bn_relu(model)
    assert type(model[0]) is MyBN and type(model[2]) is nn.SyncBatchNorm


def test_convert_sync_batchnorm_refuses_to_drop_the_relu():
    model = fuse_bn_relu(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()))
    with pytest.raises(RuntimeError, match="drop its ReLU"):
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with pytest.raises(RuntimeError, match="drop its ReLU"):
        nn.SyncBatchNorm.convert_sync_batchnorm(BatchNormReLU2d(3))
    # converting first and fusing afterwards works (SyncBatchNorm is left as it is)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()))
    assert type(fuse_bn_relu(synced)[0]) is nn.SyncBatchNorm
    assert BatchNormReLU2d(3).num_features == 3 and "BatchNormReLU2d(3," in repr(BatchNormReLU2d(3))


def test_backend_is_passed_on():
    model = fuse_bn_relu(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), backend="reference")
    assert model[0].backend == "reference"
    assert isinstance(fastopt.nn.BatchNormReLU2d.from_batchnorm(nn.BatchNorm2d(3)), BatchNormReLU2d)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "not_inplace"])
def test_shared_relu_skips_the_pass_after_a_fused_batchnorm(inplace):
    """torchvision's block calls one ReLU module after bn1 and after the residual add: after fusing,
    only the add's call runs a ReLU (Note [a shared ReLU after a fused BatchNorm]); outputs, grads and
    running statistics stay the unfused model's, in float64 to a few ulps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.relus = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.relus += func.__name__.split(".")[0] in ("relu", "relu_")
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(4), BasicBlock(4)).double()
    for block in model:
        block.relu = nn.ReLU(inplace=inplace)
    _randomize_bn(model)
    plain = copy.deepcopy(model)
    fuse_bn_relu(model)
    assert all(type(b.relu) is SharedReLU and b.relu.inplace == inplace for b in model)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    with Ops() as ops:
        model(x)
    assert ops.relus == 2  # the two residual adds' (was 4: bn1's too)
    with Ops() as ops:
        plain(x)
    assert ops.relus == 4
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), plain(xb)
    assert_close(ya, yb, rtol=1e-12, atol=1e-13, what="output")
    ya.sum().backward()
    yb.sum().backward()
    assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-13, what="grad of x")
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert_close(a, b, rtol=1e-12, atol=1e-13, what=name)
    # anything else through the shared module is a plain ReLU
    t = torch.randn(6, dtype=torch.float64)
    assert torch.equal(model[0].relu(t.clone()), torch.relu(t))
