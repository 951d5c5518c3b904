"""bf16/fp16 params without master weights, stored with ``compensation`` (issue 27; Note [param
store], csrc/include/fastopt/update_math.h): "kahan" keeps the rounding error of each store in
``state['compensation']`` and updates param + compensation, "stochastic" rounds the param with the
bits of (seed, step, index). Both keep the updates that round-to-nearest drops; the cpu kernels
store what the reference rules store; a resume is bit for bit; float32 params are stored as
without it; bad input is refused with nothing written; state dicts move to and from torch.optim."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastopt
from test_state_dtype import _fuse_alike as fuse_alike

BF16 = torch.bfloat16
NAMES = ("Adam", "AdamW", "Adagrad", "RMSprop", "SGD")
# configs that keep every state slot
CONFIGS = {
    "Adam": {"amsgrad": True},
    "AdamW": {"weight_decay": 0.1},
    "Adagrad": {"lr_decay": 0.01},
    "RMSprop": {"momentum": 0.5, "centered": True},
    "SGD": {"momentum": 0.9, "dampening": 0.1},
}
needs_cpu = pytest.mark.skipif("cpu" not in fastopt.available_backends("cpu"), reason="the cpu backend is not built")
# these tests make CPU tensors: triton runs them in Triton's interpreter (TRITON_INTERPRET=1, the
# default here without a GPU); tests/test_state_dtype.py also runs it on the GPU
needs_triton = pytest.mark.skipif("triton" not in fastopt.available_backends("cpu"),
                                  reason="triton does not run on CPU tensors here (TRITON_INTERPRET unset or no Triton)")
needs_cuda = pytest.mark.skipif("cuda" not in fastopt.available_backends("cuda"),
                                reason="the cuda backend does not run here (no GPU, or built without CUDA)")
# the backends whose kernels store with compensation, on CPU tensors; and the cuda kernels, on the GPU
KERNELS = [pytest.param("cpu", marks=needs_cpu), pytest.param("triton", marks=needs_triton)]
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])
BACKENDS = ["reference", *KERNELS]
BF16_ULP = 2.0**-7  # relative spacing of bf16 values (8 significant bits): the step at 1.0
FP16_ULP = 2.0**-10


def _params(dtype=BF16, n=70_000):
    """Odd shapes: several chunks (n = 70,000 > 2 x 32K elements; 40,000: 3 x 16K, Triton's),
    an empty param, a transposed one, a channels_last one, a 1-element one; and a float32 param
    (stored as without compensation)."""
    torch.manual_seed(0)
    return [
        torch.randn(n, dtype=dtype),
        torch.randn(0, 3, dtype=dtype),
        torch.randn(7, 5, dtype=dtype).t(),
        torch.randn(2, 3, 4, 5, dtype=dtype).to(memory_format=torch.channels_last),
        torch.randn(1, dtype=dtype),
        torch.randn(9),
    ]


def _grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(steps)]


def _make(name, params, backend, compensation, groups=1, **extras):
    cut = len(params) // 2
    spec = [{"params": params}] if groups == 1 else [{"params": params[:cut]}, {"params": params[cut:], "lr": 3e-3}]
    return getattr(fastopt, name)(spec, lr=1e-2, backend=backend, compensation=compensation,
                                  **CONFIGS[name], **extras)


def _run(name, backend, compensation, *, params=None, grads=None, groups=1, steps=4, device="cpu", **extras):
    params = [p.to(device).clone().requires_grad_() for p in (params if params is not None else _params())]
    grads = [[g.to(device) for g in gs] for gs in (grads if grads is not None else _grads(params, steps))]
    opt = _make(name, params, backend, compensation, groups, **extras)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt, params


def _value(opt, p):
    """What a kahan param stands for: param + compensation, in float32."""
    st = opt.state[p]
    return p.float() + st["compensation"].float() if "compensation" in st else p.float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("compensation", [None, "kahan", "stochastic"])
def test_small_updates_are_kept(compensation, dtype, backend):
    """What compensation is for: AdamW with betas (0, 0) (its moments are then the grad and its
    square, exact in any dtype: bf16 moments rounded to nearest would stall short of 1 and slow the
    steps) and a constant grad moves every param by lr = 1e-3 a step (m_hat / sqrt(v_hat) = 1; no
    weight decay), an eighth of the ulp where the params start (2^-7:
    bf16 at 1.0, fp16 at 8.0). Rounded to nearest every update is lost and the param stays where
    it was for ever (the failure shown).
    After 100 steps the float32 run is at start - 0.1:
    * "kahan": param + compensation equals it to the rounding of the compensation's stores (each
      store rounds a value below half an ulp of the param, 2^-8 x start, to 8 or 11 bits: at most
      2^-17 x start a step in bf16, 100 steps < 1e-3 x start), the param within an ulp of it;
    * "stochastic" (bf16): the mean over 20,000 elements (each rounding unbiased; an element's
      error after 100 steps is a sum of 100 independent ones of at most one ulp, std <= 2^-7 x
      sqrt(100) / 2 = 0.04, so the mean's std <= 3e-4), allowed 2e-3. In Triton's interpreter
      (a step of 20,000 elements takes a second) 4,096 elements: std <= 6.3e-4, 2e-3 > 3 sigma;
      and no compensation=None case (the store to nearest is every parity test's)."""
    if compensation == "stochastic" and dtype == torch.float16:
        pytest.skip("compensation='stochastic' rounds to bfloat16 (test_errors: refused for float16)")
    if backend == "triton" and compensation is None:
        pytest.skip("rounding to nearest: the triton parity tests store so on every step")
    start = 1.0 if dtype == BF16 else 8.0
    p = torch.full((4_096 if backend == "triton" else 20_000,), start, dtype=dtype, requires_grad=True)
    opt = fastopt.AdamW([p], lr=1e-3, betas=(0.0, 0.0), weight_decay=0.0, backend=backend,
                        compensation=compensation)
    for _ in range(100):
        p.grad = torch.ones_like(p)
        opt.step()
    if backend != "reference":
        assert opt.step_stats.kernel == 1 and opt.step_stats.reference == 0
    want = start - 100 * 1e-3
    if compensation is None:
        assert torch.equal(p, torch.full_like(p, start))
    elif compensation == "kahan":
        assert opt.state[p]["compensation"].dtype == dtype
        value = _value(opt, p).detach()
        assert float((value - want).abs().max()) < 1e-3 * start
        assert float((p.float() - want).abs().max()) <= 2.0**-7  # the ulp at the start, both dtypes
    else:
        assert "compensation" not in opt.state[p] and opt.state[p]["seed"].dtype == torch.int64
        assert abs(float(p.float().mean()) - want) < 2e-3, float(p.float().mean())
        assert len(p.unique()) > 1  # rounded up and down: not a deterministic rounding


@pytest.mark.parametrize("backend", [*KERNELS, CUDA])
@pytest.mark.parametrize("state_dtype", [None, BF16], ids=["state-as-params", "bf16-state"])
@pytest.mark.parametrize("compensation", ["kahan", "stochastic"])
@pytest.mark.parametrize("name", NAMES)
def test_kernels_store_like_the_reference(name, compensation, state_dtype, backend):
    """Four steps, two param groups, odd layouts, a float32 param among bf16 ones (on the GPU for
    the cuda kernels, the reference beside them there; no fallback, no warning): the kernels ran
    every param; the kernels' float32 results differ from the reference's ops by an ulp where a
    sqrt or a multiply-add rounds otherwise (tests/test_state_dtype.py), so:
    * kahan: param + compensation agrees to float32 rounding of the values the steps reach (a few
      ulps a step of values up to ~4: atol 1e-5), the param within one bf16 ulp;
    * stochastic: every param within one bf16 ulp, and bit for bit almost everywhere (an ulp's
      difference in the float32 value moves a stochastic rounding once in 2^16: at most 1 in 1,000
      elements allowed, for the ulps a sqrt passes on to the moments too)."""
    extras = {} if state_dtype is None else {"state_dtype": state_dtype}
    params = _params(n=40_000 if backend == "triton" else 70_000)
    dev = "cuda" if backend == "cuda" else "cpu"
    ref, ref_params = _run(name, "reference", compensation, params=params, groups=2, device=dev, **extras)
    with warnings.catch_warnings():
        # no fallback: fastopt's warnings are errors (not others': Triton 3.6's interpreter warns
        # of a NumPy deprecation from inside the kernels)
        warnings.filterwarnings("error", message="fastopt")
        cpu, cpu_params = _run(name, backend, compensation, params=params, groups=2, device=dev, **extras)
    assert cpu.step_stats.kernel == len(cpu_params) and cpu.step_stats.reference == 0
    assert ref.step_stats.reference == len(ref_params)
    for i, (a, b) in enumerate(zip(cpu_params, ref_params)):
        sa, sb = cpu.state[a], ref.state[b]
        assert sa.keys() == sb.keys(), i
        if a.dtype == torch.float32:  # stored as without compensation
            assert "compensation" not in sa and ("seed" in sa) == (state_dtype is not None)
            continue
        # where a bf16 momentum buffer (RMSprop's goes through the sqrt; SGD's is rounded to
        # nearest or stochastically) went to the other bf16 neighbour, the param moved by lr x that
        # ulp more (2^-7 x |buf|; two such): absolute, it may move a param near 0 by more than its
        # own ulp (seen in Triton's interpreter under torch 2.11: SGD, 0.00275 vs 0.00272)
        buf = sb.get("momentum_buffer")
        drift = 0 if buf is None or not buf.numel() else 1e-2 * 2 * BF16_ULP * float(buf.float().abs().max())
        # (the cpu kernels keep the bound they had before: within one bf16 ulp)
        torch.testing.assert_close(a.float(), b.float(), rtol=BF16_ULP, atol=1e-6 + (0 if backend == "cpu" else drift),
                                   msg=f"param {i}")
        if compensation == "kahan":
            assert sa["compensation"].dtype == BF16
            atol = 1e-5 + drift
            if backend != "cpu" or not fuse_alike():  # as tests/test_state_dtype.py derives it: a moment on the other
                atol = max(atol, 4 * 1e-2 * 2 * BF16_ULP)  # bf16 neighbour, x lr, x 4 steps
            torch.testing.assert_close(_value(cpu, a), _value(ref, b), rtol=0, atol=atol, msg=f"param {i}")
        else:
            assert "compensation" not in sa and int(sa["seed"]) == int(sb["seed"])
            assert int((a != b).sum()) <= max(1, a.numel() // 1000), f"param {i}: {int((a != b).sum())} differ"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compensation", ["kahan", "stochastic"])
def test_a_resume_is_bit_for_bit(compensation, backend):
    """Six steps against three, a state dict (deep-copied, as torch.save would), three more in a
    fresh optimizer; and the same six steps twice give the same bits (the rounding is a function of
    seed, step and index, not of a global generator)."""
    params = _params(n=40_000 if backend == "triton" else 70_000)  # 3 Triton chunks: the interpreter is slow
    grads = _grads(params, 6)
    whole, whole_params = _run("AdamW", backend, compensation, params=params, grads=grads)
    again, again_params = _run("AdamW", backend, compensation, params=params, grads=grads)
    first, first_params = _run("AdamW", backend, compensation, params=params, grads=grads[:3])
    saved = copy.deepcopy(first.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in first_params]
    resumed = _make("AdamW", resumed_params, backend, compensation)
    resumed.load_state_dict(saved)
    for step_grads in grads[3:]:
        for p, g in zip(resumed_params, step_grads):
            p.grad = g.clone()
        resumed.step()
    for opt, ps in ((again, again_params), (resumed, resumed_params)):
        for a, b in zip(whole_params, ps):
            assert torch.equal(a, b)
            sa, sb = whole.state[a], opt.state[b]
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compensation", ["kahan", "stochastic"])
def test_autograd_grads_and_float32_params(compensation, backend):
    """A bf16 Linear next to a float32 one, grads from autograd, two groups: the float32 params are
    stored exactly as without compensation (the same bits as a run without it); the bf16 ones keep
    a compensation buffer or a seed."""
    runs = {}
    for comp in (None, compensation):
        torch.manual_seed(0)
        low, full = torch.nn.Linear(33, 17).to(BF16), torch.nn.Linear(17, 5)
        opt = fastopt.Adam([{"params": low.parameters()}, {"params": full.parameters(), "lr": 1e-3}],
                           backend=backend, compensation=comp)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 33, generator=gen).to(BF16), torch.randn(8, 17, generator=gen)
            # two losses: the float32 layer's grads do not depend on the bf16 layer's values
            (low(x).float().square().sum() + full(y).square().sum()).backward()
            opt.step()
            opt.zero_grad()
        runs[comp] = (low, full, opt)
    low, full, opt = runs[compensation]
    if backend != "reference":
        assert opt.step_stats.kernel == 4 and opt.step_stats.reference == 0
    for a, b in zip(full.parameters(), runs[None][1].parameters()):
        assert torch.equal(a, b) and "compensation" not in opt.state[a] and "seed" not in opt.state[a]
    for p in low.parameters():
        assert ("compensation" in opt.state[p]) == (compensation == "kahan")
        assert ("seed" in opt.state[p]) == (compensation == "stochastic")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_skip_leaves_everything(backend):
    """A step that GradScaler skips (found_inf) changes nothing: params, compensation, state."""
    for compensation in ("kahan", "stochastic"):
        opt, ps = _run("Adam", backend, compensation, steps=2, max_grad_norm=0.5)
        before = [p.detach().clone() for p in ps]
        states = copy.deepcopy([dict(opt.state[p]) for p in ps])
        opt.found_inf = torch.ones(())
        opt.grad_scale = torch.full((), 1024.0)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        for p, b, st in zip(ps, before, states):
            assert torch.equal(p, b)
            assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())


def test_errors_and_nothing_written():
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid compensation"):
        fastopt.Adam([p], compensation="exact")
    with pytest.raises(ValueError, match="cannot be combined with master_weights"):
        fastopt.AdamW([p], compensation="kahan", master_weights=True)
    ok = torch.randn(3, dtype=BF16, requires_grad=True)
    half = torch.randn(3, dtype=torch.float16, requires_grad=True)
    for backend in [b for b in ("reference", "cpu") if b in fastopt.available_backends("cpu")]:
        opt = fastopt.Adam([ok, half], backend=backend, compensation="stochastic")
        ok.grad, half.grad = torch.ones(3, dtype=BF16), torch.ones(3, dtype=torch.float16)
        before = ok.detach().clone(), half.detach().clone()
        with pytest.raises(ValueError, match="compensation='stochastic' rounds to bfloat16; this param is"):
            opt.step()
        assert torch.equal(ok, before[0]) and torch.equal(half, before[1]) and len(opt.state) == 0
    emb = torch.nn.Embedding(5, 3, sparse=True).to(BF16)
    opt = fastopt.Adagrad(emb.parameters(), compensation="kahan")
    emb(torch.tensor([1, 2])).sum().backward()
    sums = copy.deepcopy(opt.state[emb.weight])
    weight = emb.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="sparse gradients cannot be combined with state_dtype or comp"):
        opt.step()
    assert torch.equal(emb.weight, weight) and all(torch.equal(opt.state[emb.weight][k], v) for k, v in sums.items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_dtype", [None, BF16], ids=["param-dtype state", "bf16 state"])
def test_a_param_that_left_bfloat16_keeps_no_stale_compensation(backend, state_dtype):
    """A kahan param turned float32 between steps has a buffer of the rounding errors of bf16
    stores that its new values no longer carry: stepped without it and turned back to bf16, the
    stale buffer would be added to it again (a silent change). So the step refuses it as a dtype
    change after the state was made (with state_dtype the moments themselves would still fit),
    writing nothing; load_state_dict(state_dict()), the message's way out, drops the buffer."""
    p = torch.nn.Parameter(torch.randn(6).to(BF16))
    q = torch.nn.Parameter(torch.randn(4).to(BF16))  # stays bf16: its buffer stays in use
    opt = fastopt.AdamW([p, q], lr=1e-3, backend=backend, compensation="kahan", state_dtype=state_dtype)
    for _ in range(2):
        p.grad, q.grad = torch.randn(6).to(BF16), torch.randn(4).to(BF16)
        opt.step()
    assert opt.state[p]["compensation"].abs().max() > 0  # the buffer holds something to go stale
    p.data = p.data.float()
    p.grad = torch.randn(6)
    before = {t: (t.detach().clone(), {k: v.clone() for k, v in opt.state[t].items()}) for t in (p, q)}
    # without state_dtype the bf16 moments refuse too: whichever check comes first names its key
    stale = "compensation" if state_dtype is not None else "(exp_avg|compensation)"
    with pytest.raises(RuntimeError, match=f"state '{stale}' of param 0 is torch.bfloat16.*was the param's dtype"):
        opt.step()
    for t, (value, state) in before.items():
        assert torch.equal(t.detach(), value) and opt.state[t].keys() == state.keys()
        assert all(torch.equal(opt.state[t][k], v) for k, v in state.items())
    opt.load_state_dict(opt.state_dict())
    assert "compensation" not in opt.state[p] and "compensation" in opt.state[q]
    opt.step()
    assert opt.step_stats.reference == (2 if backend == "reference" else 0)


@needs_cpu
def test_the_list_op_checks_what_it_stores():
    """torch.ops.fastopt's ops (what torch.compile runs): compensation needs what it stores."""
    p, g = [torch.ones(4, dtype=BF16)], [torch.ones(4, dtype=BF16)]
    m, v, steps = [torch.zeros(4, dtype=BF16)], [torch.zeros(4, dtype=BF16)], [torch.zeros(())]
    hyper = (0.9, 0.999, 1e-8, 0.0, False, False, False)
    lr = torch.tensor(1e-3, dtype=torch.float64)
    adam = torch.ops.fastopt.adam_
    with pytest.raises(RuntimeError, match="compensation='kahan' takes the compensation buffers as `params_out`"):
        adam(p, g, m, v, [], steps, [], lr, *hyper, None, None, None, None, compensation="kahan")
    with pytest.raises(RuntimeError, match="a stochastic store needs `seeds`"):
        adam(p, g, m, v, [], steps, [], lr, *hyper, None, None, None, None, compensation="stochastic")
    with pytest.raises(RuntimeError, match="compensation must be None, 'kahan' or 'stochastic'"):
        adam(p, g, m, v, [], steps, [], lr, *hyper, None, None, None, None, compensation="exact")
    with pytest.raises(RuntimeError, match="nothing is stored stochastically"):
        adam(p, g, m, v, [], steps, [], lr, *hyper, None, None, None, None, seeds=torch.zeros(1, dtype=torch.int64))
    assert torch.equal(p[0], torch.ones(4, dtype=BF16)) and float(steps[0]) == 0.0
    comp = [torch.zeros(4, dtype=BF16)]
    adam(p, g, m, v, [], steps, comp, lr, *hyper, None, None, None, None, compensation="kahan")
    # 1 - 1e-3 rounds back to 1.0 in bf16; the compensation keeps the -1e-3
    assert torch.equal(p[0], torch.ones(4, dtype=BF16)) and float(steps[0]) == 1.0
    torch.testing.assert_close(comp[0].float(), torch.full((4,), -1e-3), rtol=BF16_ULP, atol=0)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), CUDA])
@pytest.mark.parametrize("state_dtype", [None, BF16], ids=["state-as-params", "bf16-state"])
@pytest.mark.parametrize("compensation", [None, "kahan", "stochastic"])
def test_torch_compile_steps_like_eager(compensation, state_dtype, backend):
    """Under torch.compile the step runs the list ops (Note [the plan life cycle]): the same bits as
    the eager step's plan (the same kernels), the seeds made in the compiled first step too."""
    if compensation is None and state_dtype is None:
        pytest.skip("neither: tests/test_compile_and_cuda.py")
    extras = {} if state_dtype is None else {"state_dtype": state_dtype}
    dev = "cuda" if backend == "cuda" else "cpu"
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        params = [p.to(dev).clone().requires_grad_() for p in _params()[:3]]
        opt = _make("AdamW", params, backend, compensation, **extras)
        step = torch.compile(opt.step) if compiled else opt.step
        for step_grads in _grads(params, 3):
            for p, g in zip(params, step_grads):
                p.grad = g.to(dev)
            step()
        assert opt.step_stats.kernel == len(params) and opt.step_stats.reference == 0
        results.append((params, opt))
    (a_params, a_opt), (b_params, b_opt) = results
    for a, b in zip(a_params, b_params):
        assert torch.equal(a, b)
        assert all(torch.equal(a_opt.state[a][k], b_opt.state[b][k]) for k in a_opt.state[a])


def test_state_dicts_move_to_and_from_torch():
    """fastopt's kahan dict loads into torch.optim (the compensation, in the param's dtype, stays an
    unused entry; torch steps on); torch.optim's dict loads into fastopt with kahan (the
    compensation starts at zero at the next step); into fastopt without compensation the buffer is
    dropped, as master_param is."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(BF16)
    ours = fastopt.AdamW(model.parameters(), lr=1e-2, compensation="kahan")
    for _ in range(2):
        model(torch.randn(5, 4, dtype=BF16)).float().sum().backward()
        ours.step()
    saved = ours.state_dict()
    assert all(s["compensation"].dtype == BF16 for s in saved["state"].values())
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2)
    theirs.load_state_dict(saved)
    for p in model.parameters():
        assert torch.equal(theirs.state[p]["exp_avg"], ours.state[p]["exp_avg"])
    theirs.step()
    fresh = fastopt.AdamW(model.parameters(), lr=1e-2, compensation="kahan")
    fresh.load_state_dict(torch.optim.AdamW(model.parameters(), lr=1e-2).state_dict())
    back = fastopt.AdamW(model.parameters(), lr=1e-2, compensation="kahan")
    back.load_state_dict(saved)
    for p in model.parameters():
        assert torch.equal(back.state[p]["compensation"], ours.state[p]["compensation"])
    plain = fastopt.AdamW(model.parameters(), lr=1e-2)
    plain.load_state_dict(saved)
    assert all("compensation" not in plain.state[p] for p in model.parameters())
    model(torch.randn(5, 4, dtype=BF16)).float().sum().backward()
    for opt in (back, plain, fresh):
        opt.step()
    assert all(fresh.state[p]["compensation"].dtype == BF16 for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stochastic_param_turned_float32_steps_without_its_seed(backend):
    """compensation="stochastic" and SGD without momentum (no moments whose dtype would refuse the
    change): a bf16 param turned float32 between steps is stepped as float32 params are (its seed
    stays in the state for a return to bf16, unused); turned back, it is rounded stochastically with
    that seed again. (The cpu kernels refused the step: a seed was passed for a float32 param.)"""
    p = torch.nn.Parameter(torch.randn(8).to(BF16))
    opt = fastopt.SGD([p], lr=0.1, backend=backend, compensation="stochastic")
    p.grad = torch.ones(8, dtype=BF16)
    opt.step()
    seed = int(opt.state[p]["seed"])
    p.data = p.data.float()
    before = p.detach().clone()
    p.grad = torch.ones(8)
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.1)  # exactly the float32 step
    assert int(opt.state[p]["seed"]) == seed
    p.data = p.data.to(BF16)
    p.grad = torch.ones(8, dtype=BF16)
    opt.step()
    assert int(opt.state[p]["seed"]) == seed and p.dtype == BF16
    assert (opt.step_stats.kernel, opt.step_stats.reference) == ((0, 1) if backend == "reference" else (1, 0))
