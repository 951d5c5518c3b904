"""Low-precision optimizer state, ``state_dtype=torch.bfloat16`` (issue 27; Note [stochastic
state], csrc/include/fastopt/update_math.h): the state tensors are bfloat16 with a seed per param,
the math is float32, the stores round stochastically with bits keyed by (seed, step, index), so
the cpu kernels and the reference rules store the same bits, whatever the threads, the param
groups or a resume; the small increments round-to-nearest would drop are kept; bad input is
refused with nothing written; state dicts move to and from torch.optim."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastopt
from conftest import backend_device
from fastopt.reference.rounding import memory_index, param_seed, slot_bits, stochastic_round_bf16

BF16 = torch.bfloat16
NAMES = ("Adam", "AdamW", "Adagrad", "RMSprop", "SGD")
# configs that keep every state slot (RMSprop's momentum_buffer and grad_avg, Adam's max_exp_avg_sq)
CONFIGS = {
    "Adam": {"amsgrad": True},
    "AdamW": {"weight_decay": 0.1},
    "Adagrad": {"lr_decay": 0.01},
    "RMSprop": {"momentum": 0.5, "centered": True},
    "SGD": {"momentum": 0.9, "dampening": 0.1},
}
# state slots that are a function of the grads alone (no sqrt, no param): with grads that do not
# depend on the params, they are the same bits on every backend (Note [torch's fused multiply-adds]
# aside); the others go through a sqrt, which ATen's vectorized kernels (the reference's ops) do not
# always round correctly (tests/test_numerics.py), and a one-ulp float32 difference moves a
# stochastic rounding to the other bf16 neighbour once in 2^16
GRAD_ONLY = {"Adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "AdamW": ("exp_avg", "exp_avg_sq"),
             "Adagrad": ("sum",), "RMSprop": ("square_avg", "grad_avg"), "SGD": ("momentum_buffer",)}

needs_cpu = pytest.mark.skipif("cpu" not in fastopt.available_backends("cpu"), reason="the cpu backend is not built")
needs_triton = pytest.mark.skipif("triton" not in fastopt.available_backends(backend_device("triton")),
                                  reason="triton does not run here (no GPU, TRITON_INTERPRET unset or no Triton)")
needs_cuda = pytest.mark.skipif("cuda" not in fastopt.available_backends("cuda"),
                                reason="the cuda backend does not run here (no GPU, or built without CUDA)")
# the backends whose kernels store stochastically
GPU_KERNELS = [pytest.param("triton", marks=needs_triton), pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]
KERNELS = [pytest.param("cpu", marks=needs_cpu), *GPU_KERNELS]
BACKENDS = ["reference", *KERNELS]


def _fuse_alike() -> bool:
    """ATen's kernels (the reference's ops) and fastopt's round multiply-adds alike (both fused or
    neither: Note [torch's fused multiply-adds])."""
    return (torch.backends.cpu.get_cpu_capability() != "DEFAULT") == (fastopt.cpu_capability() != "default")


def _params(dtype=torch.float32, n=70_000):
    """Odd shapes: several chunks (n = 70,000 > 2 x 32K elements; 40,000: 3 x 16K, Triton's),
    an empty param, a transposed one, a channels_last one, a 1-element one."""
    torch.manual_seed(0)
    return [
        torch.randn(n, dtype=dtype),
        torch.randn(0, 3, dtype=dtype),
        torch.randn(7, 5, dtype=dtype).t(),
        torch.randn(2, 3, 4, 5, dtype=dtype).to(memory_format=torch.channels_last),
        torch.randn(1, dtype=dtype),
    ]


def _grads(params, steps, seed=1):
    """Hand-made grads, one list per step (independent of the params)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(steps)]


STEPS = 4  # of _run, by default


def _run(name, backend, *, params=None, grads=None, groups=1, steps=STEPS, extras=None, config=None, device=None):
    """``steps`` steps of the optimizer on ``backend``, on the backend's device (or ``device``)."""
    dev = device or backend_device(backend)
    params = [p.to(dev).clone().requires_grad_() for p in (params if params is not None else _params())]
    grads = [[g.to(dev) for g in gs] for gs in (grads if grads is not None else _grads(params, steps))]
    cut = len(params) // 2
    spec = [{"params": params}] if groups == 1 else [{"params": params[:cut]}, {"params": params[cut:]}]
    opt = getattr(fastopt, name)(spec, lr=1e-2, backend=backend, state_dtype=BF16,
                                 **(CONFIGS[name] if config is None else config), **(extras or {}))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt, params


def _states(opt, params):
    return [opt.state[p] for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_state_is_bfloat16_with_a_seed(name, backend):
    opt, params = _run(name, backend, steps=2)
    stats = opt.step_stats
    assert (stats.kernel, stats.reference) == ((len(params), 0) if backend != "reference" else (0, len(params)))
    keys = GRAD_ONLY[name] + (("momentum_buffer",) if name == "RMSprop" else ())
    for i, (p, st) in enumerate(zip(params, _states(opt, params))):
        for key in keys:
            assert st[key].dtype == BF16 and st[key].shape == p.shape and st[key].stride() == p.stride(), key
        assert st["seed"].dtype == torch.int64 and st["seed"].device.type == "cpu"
        assert int(st["seed"]) == param_seed(i)
        assert p.dtype == torch.float32


@needs_cpu
@pytest.mark.parametrize("name", NAMES)
def test_cpu_kernels_store_the_references_bits(name):
    """Four steps, two param groups, odd layouts: the grads-only state slots are the reference's
    bit for bit (where both round multiply-adds alike), the rest within one bf16 ulp where a sqrt
    rounded differently, the params close (float32)."""
    ref, ref_params = _run(name, "reference", groups=2)
    cpu, cpu_params = _run(name, "cpu", groups=2)
    assert cpu.step_stats.kernel == len(cpu_params) and cpu.step_stats.reference == 0
    for i, (a, b) in enumerate(zip(_states(cpu, cpu_params), _states(ref, ref_params))):
        for key, want in b.items():
            got = a[key]
            if key in GRAD_ONLY[name] and _fuse_alike() or key in ("step", "seed"):
                assert torch.equal(got, want), f"param {i} {key}: {int((got != want).sum())} elements differ"
            else:  # one bf16 ulp (2^-8 relative) where the float32 values differed by an ulp
                torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6, msg=f"param {i} {key}")
    for a, b, st in zip(cpu_params, ref_params, _states(ref, ref_params)):
        # float32 params: a few ulps per step from the sqrt and the fused multiply-adds, over 4
        # steps; where RMSprop's momentum buffer (which goes through the sqrt) went to the other
        # bf16 neighbour, the param moved by lr x that ulp more (2^-7 x |buf| at most; two such)
        buf = st.get("momentum_buffer")
        atol = 1e-6 if buf is None or not buf.numel() else 1e-2 * 2 * 2**-7 * float(buf.float().abs().max())
        if not _fuse_alike():
            # the grads-only slots too may sit on the other bf16 neighbour (an fp32 ulp apart
            # before rounding): a moment one bf16 ulp (2^-7 relative at most) off moves the
            # normalized step by 2^-7 of |m_hat / sqrt(v_hat)| (at most sqrt(steps) = 2, Cauchy-
            # Schwarz over the bias-corrected sums), x lr, x 4 steps
            atol = max(atol, 4 * 1e-2 * 2 * 2**-7)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("name", NAMES)
def test_gpu_kernels_store_the_references_bits(name, backend):
    """The Triton kernels (Note [stochastic stores in Triton], triton_kernels/common.py) and the
    CUDA kernels (csrc/cuda/update.cu) against the reference on the same device, four steps, two param groups, odd layouts: the kernels ran; every
    state slot is the reference's bit for bit almost everywhere (the same random bits: other bits
    would move about half the roundings of values not exactly on a bf16 number; where the float32
    values differ by an ulp, from a sqrt or a multiply-add rounded otherwise than the reference's
    ops, a stochastic rounding moves once in 2^16, and a moment one bf16 neighbour off moves the
    slots computed from it: at most 1 in 1,000 elements allowed) and within k bf16 ulps after k
    steps everywhere (values d ulps apart are beta x d < d apart after the next update, the same
    grads, and two roundings put them at most d + 1 apart: seen 2 ulps apart after 4 steps in the
    interpreter under torch 2.11); the params close (float32; the tolerance of
    test_cpu_kernels_store_the_references_bits)."""
    dev = backend_device(backend)
    params = _params(n=40_000)  # 3 chunks of 16K (the interpreter is slow)
    ref, ref_params = _run(name, "reference", params=params, groups=2, device=dev)
    tri, tri_params = _run(name, backend, params=params, groups=2)
    assert tri.step_stats.kernel == len(tri_params) and tri.step_stats.reference == 0
    for i, (a, b) in enumerate(zip(_states(tri, tri_params), _states(ref, ref_params))):
        assert a.keys() == b.keys()
        for key, want in b.items():
            got = a[key]
            if key in ("step", "seed"):
                assert torch.equal(got, want), (i, key)
                continue
            assert int((got != want).sum()) <= max(1, want.numel() // 1000), f"param {i} {key}"
            torch.testing.assert_close(got.float(), want.float(), rtol=STEPS * 2**-7, atol=1e-6, msg=f"param {i} {key}")
    for a, b in zip(tri_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=4 * 1e-2 * 2 * 2**-7)


@needs_cpu
@pytest.mark.parametrize("name", NAMES)
def test_same_bits_for_any_threads_and_groups(name):
    """The bits depend on (seed, step, index) only: one thread or two, one param group or two (other
    chunk tables), every tensor bit for bit."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_params = _run(name, "cpu")
    finally:
        torch.set_num_threads(threads)
    two, two_params = _run(name, "cpu", groups=2)
    for a, b in zip(one_params, two_params):
        assert torch.equal(a, b)
    for a, b in zip(_states(one, one_params), _states(two, two_params)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reference_rounds_each_slot_with_its_own_stream():
    """The reference's store is the specification's rounding with seed + slot, the step after its
    increment and the param's memory index (what the cpu kernels reproduce above): Adagrad's sum
    after one step, recomputed here from its float32 value."""
    p = torch.randn(6, 4).t().requires_grad_()  # transposed: memory order is not row-major
    g = torch.randn(4, 6)
    opt = fastopt.Adagrad([p], lr=0.1, initial_accumulator_value=0.3, backend="reference", state_dtype=BF16)
    p.grad = g.clone()
    opt.step()
    # the sum starts at bf16(0.3) and gets g * g (float32)
    exact = torch.full_like(p, 0.3, dtype=BF16).float() + g * g
    assert slot_bits(param_seed(0), 0) == (param_seed(0), 0)  # slot 0: the low half of the param's stream
    want = stochastic_round_bf16(exact.contiguous(), param_seed(0), 1, index=memory_index(p).contiguous())
    assert torch.equal(opt.state[p]["sum"], want)
    assert not torch.equal(want, exact.to(BF16)), "the rounding must differ from round-to-nearest somewhere"


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_increments_are_kept(backend):
    """What stochastic rounding is for: Adagrad's sum at 1.0 grows by g^2 = 1e-4 a step, 1/78 of a
    bf16 ulp at 1.0 (2^-7): stored to nearest it would stay 1.0 for ever; stored stochastically
    its mean over n = 20,000 elements after 100 steps is 1.01 (each element's rounding is unbiased;
    an element's value is 1 + 2^-7 x (its round-ups, ~Binomial(100, 1/78)), so the mean's standard
    deviation is sigma = 2^-7 x sqrt(100 / 78 / n) ~ 6.3e-5, allowed 3.15 sigma, 2e-4). In Triton's
    interpreter (a step of 20,000 elements takes a second) n = 4,096."""
    n = 4_096 if backend == "triton" and backend_device(backend) == "cpu" else 20_000
    p = torch.zeros(n, device=backend_device(backend), requires_grad=True)
    opt = fastopt.Adagrad([p], lr=1e-3, initial_accumulator_value=1.0, backend=backend, state_dtype=BF16)
    for _ in range(100):
        p.grad = torch.full_like(p, 1e-2)
        opt.step()
    assert (opt.step_stats.kernel, opt.step_stats.reference) == ((0, 1) if backend == "reference" else (1, 0))
    s = opt.state[p]["sum"].float()
    assert abs(float(s.mean()) - 1.01) < 3.15 * 2**-7 * (100 / 78 / n) ** 0.5, float(s.mean())
    assert float(s.min()) >= 1.0  # never rounded down below where it started


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_a_resume_is_bit_for_bit(name, backend):
    """Six steps against three, a state dict (through torch.save), three more in a fresh optimizer."""
    params = _params(n=40_000 if backend == "triton" else 70_000)  # 3 Triton chunks: the interpreter is slow
    grads = _grads(params, 6)
    whole, whole_params = _run(name, backend, params=params, grads=grads)
    first, first_params = _run(name, backend, params=params, grads=grads[:3])
    saved = copy.deepcopy(first.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in first_params]
    resumed = getattr(fastopt, name)(resumed_params, lr=1e-2, backend=backend, state_dtype=BF16, **CONFIGS[name])
    resumed.load_state_dict(saved)
    for step_grads in grads[3:]:
        for p, g in zip(resumed_params, step_grads):
            p.grad = g.clone()
        resumed.step()
    for a, b in zip(whole_params, resumed_params):
        assert torch.equal(a, b)
    for a, b in zip(_states(whole, whole_params), _states(resumed, resumed_params)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_params(backend):
    """bf16 params without masters (their state bf16, stored stochastically) and with fp32 masters
    (bf16 state, fp32 masters): the state's dtype, the cpu kernels ran."""
    for master in (False, True):
        params = _params(BF16)
        opt, ps = _run("AdamW", backend, params=params, extras={"master_weights": master}, steps=2)
        st = opt.state[ps[0]]
        assert st["exp_avg"].dtype == BF16 and st["exp_avg_sq"].dtype == BF16
        assert ("master_param" in st) == master and (not master or st["master_param"].dtype == torch.float32)
        assert ps[0].dtype == BF16
        if backend != "reference":
            assert opt.step_stats.kernel == len(ps) and opt.step_stats.reference == 0


@needs_cpu
def test_low_precision_params_cpu_equals_reference():
    """bf16 params with fp32 masters: the cpu kernels' grads-only state is the reference's bits."""
    for master in (False, True):
        ref, ref_params = _run("Adam", "reference", params=_params(BF16), extras={"master_weights": master})
        cpu, cpu_params = _run("Adam", "cpu", params=_params(BF16), extras={"master_weights": master})
        for a, b in zip(_states(cpu, cpu_params), _states(ref, ref_params)):
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if _fuse_alike():
                    assert torch.equal(a[key], b[key]), key
                else:  # one bf16 ulp: the products rounded once or twice moved the rounding's input
                    torch.testing.assert_close(a[key].float(), b[key].float(), rtol=2**-7, atol=1e-6)
        for a, b in zip(cpu_params, ref_params):
            # bf16 params: one bf16 ulp (2^-8 relative) where the float32 results differed by an ulp
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_and_grad_scaler_skip(backend):
    """Norm clipping clips the grads as they are; a step whose grads hold an inf under a
    GradScaler-style found_inf changes nothing (params, state, step), with bf16 state."""
    params = _params()
    opt, ps = _run("Adam", backend, params=params, extras={"max_grad_norm": 0.5}, steps=2)
    assert opt.last_grad_norm is not None and float(opt.last_grad_norm) > 0.5
    before = [p.detach().clone() for p in ps]
    states = copy.deepcopy([dict(opt.state[p]) for p in ps])
    assert opt.step_stats.reference == (len(ps) if backend == "reference" else 0)
    opt.found_inf = torch.ones((), device=ps[0].device)
    opt.grad_scale = torch.full((), 1024.0, device=ps[0].device)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, b, st in zip(ps, before, states):
        assert torch.equal(p, b)
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())


def test_errors_and_nothing_written():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        fastopt.Adam([p], state_dtype=torch.float16)
    ok = torch.randn(3, requires_grad=True)
    bad = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = fastopt.Adam([ok, bad], backend="reference", state_dtype=BF16)
    ok.grad, bad.grad = torch.ones(3), torch.ones(3, dtype=torch.float64)
    before = ok.detach().clone()
    with pytest.raises(ValueError, match="state_dtype=torch.bfloat16 is for float32, float16 and bfloat16"):
        opt.step()
    assert torch.equal(ok, before) and len(opt.state) == 0
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = fastopt.Adagrad(emb.parameters(), state_dtype=BF16)
    emb(torch.tensor([1, 2])).sum().backward()
    sums = copy.deepcopy(opt.state[emb.weight])
    with pytest.raises(NotImplementedError, match="sparse gradients cannot be combined with state_dtype"):
        opt.step()
    assert all(torch.equal(opt.state[emb.weight][k], v) for k, v in sums.items())


@pytest.mark.parametrize("name", NAMES)
def test_state_dicts_move_to_and_from_torch(name):
    """torch.optim's dict (float32 moments, no seed) loads into state_dtype=bf16: the moments
    become bf16 (rounded to nearest), the params get seeds at the next step. fastopt's bf16 dict
    loads into torch.optim: moments cast to float32 (exactly), the seed kept as an unused entry,
    and torch steps on. Into fastopt without state_dtype: float32 moments, no seed."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    config = CONFIGS[name]
    torch_opt = getattr(torch.optim, name)(model.parameters(), lr=1e-2, **config)
    model(torch.randn(5, 4)).sum().backward()
    torch_opt.step()
    ours = getattr(fastopt, name)(model.parameters(), lr=1e-2, state_dtype=BF16, **config)
    ours.load_state_dict(torch_opt.state_dict())
    for p in model.parameters():
        st = ours.state[p]
        for key, value in torch_opt.state[p].items():
            if key != "step":
                assert st[key].dtype == BF16 and torch.equal(st[key], value.to(BF16)), key
        assert "seed" not in st
    ours.step()
    assert all("seed" in ours.state[p] for p in model.parameters())
    if name == "SGD":  # the loaded buffer had a step behind it (Note [SGD's first step]): not restarted
        assert all(float(ours.state[p]["step"]) == 2.0 for p in model.parameters())
    saved = ours.state_dict()
    back = getattr(torch.optim, name)(model.parameters(), lr=1e-2, **config)
    back.load_state_dict(saved)
    for p in model.parameters():
        for key, value in ours.state[p].items():
            if key not in ("step", "seed"):
                assert back.state[p][key].dtype == torch.float32 and torch.equal(back.state[p][key], value.float())
    back.step()  # torch steps with the extra entry there
    plain = getattr(fastopt, name)(model.parameters(), lr=1e-2, **config)
    plain.load_state_dict(saved)
    for p in model.parameters():
        assert "seed" not in plain.state[p]
        assert name != "SGD" or "step" not in plain.state[p]  # torch.optim.SGD's keys: its plans count
        assert all(v.dtype == torch.float32 for k, v in plain.state[p].items())
    plain.step()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_cuda_kernels_store_stochastically(backend):
    """backend="cuda" (and "auto", which picks it on a GPU) runs bf16 state on the cuda kernels
    themselves: no fallback, no warning, the kernels counted; grads from backward, two groups."""
    torch.manual_seed(0)
    model = torch.nn.Linear(33, 17).cuda()
    opt = fastopt.AdamW([{"params": [model.weight]}, {"params": [model.bias], "lr": 1e-3}], backend=backend,
                        state_dtype=BF16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastopt")  # a fallback's warning (only fastopt's)
        for _ in range(2):
            model(torch.randn(8, 33, device="cuda")).square().sum().backward()
            opt.step()
    assert (opt.step_stats.kernel, opt.step_stats.reference) == (2, 0)
    assert {b.backend.name for b in opt._run.plan.buckets} == {"cuda"}
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].dtype == BF16 and int(opt.state[p]["step"]) == 2


@needs_cpu
def test_autograd_grads_then_a_dtype_change():
    """Grads as autograd makes them (a Linear's weight and bias, two groups): the kernels ran and
    store the reference's bits for the grads-only slots (one step: the grads are the same on both);
    then ``model.double()`` between steps is refused before anything is written."""
    states = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        model = torch.nn.Linear(33, 17)
        opt = fastopt.AdamW([{"params": [model.weight]}, {"params": [model.bias], "lr": 1e-3}],
                            backend=backend, state_dtype=BF16)
        model(torch.randn(8, 33)).square().sum().backward()
        opt.step()
        states[backend] = copy.deepcopy([opt.state[p] for p in model.parameters()])
    assert opt.step_stats.kernel == 2 and opt.step_stats.reference == 0
    for got, want in zip(states["cpu"], states["reference"]):
        for key in GRAD_ONLY["AdamW"] if _fuse_alike() else ():
            assert torch.equal(got[key], want[key]), key
        for key in GRAD_ONLY["AdamW"]:  # one bf16 ulp where the multiply-adds rounded otherwise
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=2**-7, atol=1e-6)
    model.double()
    model(torch.randn(8, 33, dtype=torch.float64)).square().sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="state_dtype=torch.bfloat16 is for float32, float16 and bfloat16 params; "
                                         "this one is torch.float64"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for now, then in zip([opt.state[p] for p in model.parameters()], states["cpu"]):
        assert all(torch.equal(now[k], v) for k, v in then.items())
