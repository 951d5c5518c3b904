"""The benchmark harness: a provider that cannot run is skipped with a note, the run goes on."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch


def _bench_harness():
    """benchmarks/harness.py (tests/ has a harness.py of its own)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "harness.py")
    spec = importlib.util.spec_from_file_location("bench_harness", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


runnable = _bench_harness().runnable


def test_a_provider_refused_at_its_first_step_is_skipped_with_a_note():
    """torch 2.11 accepts Adagrad(fused=True) for CUDA params at construction and refuses it at
    the first step; the first GPU benchmark died there. Here a provider that raises the same way."""
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    good = torch.optim.Adagrad([p]).step

    def refused():
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of\nsupported devices")

    notes: set[str] = set()
    steps = runnable({"torch fused": refused, "torch for-loop": good}, notes)
    assert list(steps) == ["torch for-loop"]
    assert notes == {"torch fused skipped: RuntimeError: `fused=True` requires all the params to be floating "
                     "point Tensors of"}


def test_a_results_file_of_another_harness_is_kept_aside(tmp_path):
    """A column added to the rows (kernel ms) must not append misaligned rows to an older CSV:
    the old file is renamed and a new one begins with the new header."""
    h = _bench_harness()
    path = str(tmp_path / "results.csv")
    with open(path, "w") as f:
        f.write("device,case,median_ms\nold,Adam,1.0\n")
    row = h.Row("Adam", "fastopt cpu", 1.0, 0.9, 1.1, 10.0, 50.0, 1.2, kernel_ms=0.5)
    env = {"device": "cpu", "date": "2026-11-30"}
    h.write_csv([row], env, path)
    h.write_csv([row], env, path)
    aside = [n for n in os.listdir(tmp_path) if n.startswith("results-until-")]
    assert len(aside) == 1 and open(tmp_path / aside[0]).read().startswith("device,case,median_ms\nold")
    lines = open(path).read().splitlines()
    assert lines[0].split(",")[-1] == "kernel_ms" and len(lines) == 3 and lines[1].endswith(",0.5")


def test_bench_resnet_fused_model_trains_like_the_unfused_one(monkeypatch):
    """bench_resnet's CPU model (torchvision's ResNet-18 architecture, one ReLU module shared per
    block): fuse_bn_relu fuses the stem's and every block's first BatchNorm (9), leaves the BatchNorms
    before a residual add alone, and one training step gives the unfused model's loss and grads."""
    import copy

    import fastopt

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "bench_resnet.py")
    spec = importlib.util.spec_from_file_location("bench_resnet", path)
    bench = importlib.util.module_from_spec(spec)
    # the script imports `harness` (benchmarks/harness.py), a name tests/harness.py also has
    monkeypatch.setitem(sys.modules, "harness", _bench_harness())
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    # float64: 20 layers deep, with 4 values per channel in the last stage, fp32's different summation
    # order (Note [BatchNorm+ReLU tolerances]) grows to ~1e-4 of the largest grad; in float64 the
    # fused model agrees to ~2e-13 relative, so a wrong fusion cannot hide under the tolerance.
    model = bench._resnet18(num_classes=10).train().double()
    fused = fastopt.nn.fuse_bn_relu(copy.deepcopy(model))
    assert sum(type(m).__name__ == "BatchNormReLU2d" for m in fused.modules()) == 9
    x, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    losses = []
    for m in (model, fused):
        loss = torch.nn.functional.cross_entropy(m(x), labels)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"grad of {n}: {m}")
