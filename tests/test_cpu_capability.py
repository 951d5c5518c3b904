"""The CPU kernels' builds (Note [CPU capabilities], CMakeLists.txt): one per capability, chosen at
import or forced with FASTOPT_CPU_CAPABILITY, and no AVX2 or AVX-512 instruction anywhere else in
the library (a wheel built anywhere must run on a CPU without them)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

import fastopt

pytestmark = pytest.mark.skipif(fastopt._ext._C is None, reason="fastopt._C is not built")

X86 = platform.machine().lower() in ("x86_64", "amd64")
LEVELS = ["default", "avx2", "avx512"] if X86 else ["default"]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "FASTOPT_CPU_CAPABILITY"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)


def test_the_best_level_unless_one_is_forced():
    supported = fastopt.cpu_capabilities()
    assert supported[0] == "default" and set(supported) <= set(LEVELS)
    forced = os.environ.get("FASTOPT_CPU_CAPABILITY")
    assert fastopt.cpu_capability() == (forced or supported[-1])


@pytest.mark.parametrize("level", LEVELS)
def test_forcing_a_level(level):
    """A level this CPU runs is used (and its kernels compute: an Adam step and a BatchNorm+ReLU
    against the reference rules); one it cannot run is refused at import with the reason."""
    code = """
import torch, fastopt
print(fastopt.cpu_capability())
torch.manual_seed(0)
ps = [torch.nn.Parameter(torch.randn(n)) for n in (1, 7, 4097)]
ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
a, b = fastopt.Adam(ps, backend="cpu"), fastopt.Adam(ref, backend="reference")
for _ in range(3):
    for p, q in zip(ps, ref):
        p.grad = torch.randn(p.shape); q.grad = p.grad.clone()
    a.step(); b.step()
assert a.step_stats.kernel == 3, a.step_stats
for p, q in zip(ps, ref):
    # fp32, 3 steps: a few ulps apart at most (this level and torch may round multiply-adds
    # differently, and torch's sqrt may be an ulp off): 1e-6 is ~8 ulps of a param of size 1
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
x = torch.randn(4, 8, 5, 5)
y = fastopt.nn.functional.batch_norm_relu(x, None, None, None, None, True, 0.1, 1e-5)
torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True)), rtol=1e-5, atol=1e-5)
"""
    result = _python(code, FASTOPT_CPU_CAPABILITY=level)
    if level in fastopt.cpu_capabilities():
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[0] == level
    else:
        assert result.returncode != 0
        assert f"FASTOPT_CPU_CAPABILITY={level}: this CPU cannot run these kernels" in result.stderr


def test_an_unknown_level_is_refused():
    result = _python("import fastopt", FASTOPT_CPU_CAPABILITY="avx3")
    assert result.returncode != 0
    assert "FASTOPT_CPU_CAPABILITY=avx3: expected one of default, avx2, avx512" in result.stderr


# ---- no AVX outside the capability kernels -------------------------------------------------------

# x86-64-v3 beyond v2: any VEX-encoded instruction (AT&T mnemonics starting with "v"), 256-bit
# registers, and the BMI1/BMI2/LZCNT/MOVBE instructions. AVX-512 (v4): 512-bit and mask registers,
# the upper 16 vector registers (EVEX only).
_V3_SCALAR = {"andn", "bextr", "blsi", "blsmsk", "blsr", "bzhi", "mulx", "pdep", "pext", "rorx", "sarx", "shlx",
              "shrx", "lzcnt", "movbe"}
_AVX512 = re.compile(r"%zmm\d|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")


def isa_violations(disassembly: str) -> dict:
    """Functions of an `objdump -d -C` listing that use AVX2 outside the AVX2 and AVX512 kernels'
    namespaces, or AVX-512 outside the AVX512 ones: {function: first such instruction}. A function
    is in a namespace when its name (demangled, or mangled where objdump leaves a clone's name
    mangled, as OpenMP's outlined bodies) holds it."""
    bad, fn = {}, None
    for line in disassembly.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            fn = head.group(1)
            continue
        parts = line.split("\t")
        if fn is None or len(parts) < 2 or not parts[1].strip():
            continue
        ins = parts[1].strip()
        mnemonic = ins.split()[0]
        in512 = "::AVX512::" in fn or "3cpu6AVX512" in fn
        in2 = in512 or "::AVX2::" in fn or "3cpu4AVX2" in fn
        if _AVX512.search(ins) or mnemonic.startswith("k"):
            if not in512:
                bad.setdefault(fn, ins)
        elif mnemonic.startswith("v") or "%ymm" in ins or mnemonic in _V3_SCALAR:
            if not in2:
                bad.setdefault(fn, ins)
    return bad


def test_the_check_finds_what_it_looks_for():
    listing = "\n".join([
        "0000000000001000 <fastopt::cpu::adam_apply(fastopt::cpu::Slots const&)>:",
        "    1000:\tvmovss (%rdi),%xmm0",
        "0000000000002000 <fastopt::cpu::AVX2::adam(fastopt::cpu::UpdateArgs const&)>:",
        "    2000:\tvfmadd132ps %ymm1,%ymm2,%ymm3",
        "    2008:\tvaddps %zmm1,%zmm2,%zmm3",
        "0000000000003000 <_ZN7fastopt3cpu6AVX5124adamERKNS0_10UpdateArgsE._omp_fn.0>:",
        "    3000:\tvaddps %zmm1,%zmm2,%zmm3",
        "    3008:\tkmovw %k1,%eax",
        "0000000000004000 <c10::detail::fp16_ieee_to_fp32_value(unsigned short)>:",
        "    4000:\tshlx %eax,%ebx,%ecx",
        "0000000000005000 <fastopt::cpu::capability()>:",
        "    5000:\tmovss (%rdi),%xmm0",
        "    5004:\tpopcnt %eax,%ebx",
    ])
    assert isa_violations(listing) == {
        "fastopt::cpu::adam_apply(fastopt::cpu::Slots const&)": "vmovss (%rdi),%xmm0",
        "fastopt::cpu::AVX2::adam(fastopt::cpu::UpdateArgs const&)": "vaddps %zmm1,%zmm2,%zmm3",
        "c10::detail::fp16_ieee_to_fp32_value(unsigned short)": "shlx %eax,%ebx,%ecx",
    }


@pytest.mark.skipif(not X86, reason="the AVX levels are x86-64's")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump (binutils)")
def test_no_avx_outside_the_capability_kernels():
    """The built library's disassembly: the baseline code (everything but the kernels' AVX2 and
    AVX512 builds) holds no AVX instruction, the AVX2 build no AVX-512 one, and the kernels are
    there in every build."""
    so = fastopt._ext._C.__file__
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True,
                             check=True).stdout
    bad = isa_violations(listing)
    assert not bad, f"{len(bad)} functions outside the capability kernels use AVX: " + "; ".join(
        f"{f} ({i})" for f, i in list(bad.items())[:10])
    rules = fastopt._ext._C.declared_rules()
    for ns in ("DEFAULT", "AVX2", "AVX512"):
        for kernel in ("norm_partials", "bn_apply"):
            assert f"fastopt::cpu::{ns}::{kernel}(" in listing, f"{ns}::{kernel} is not in {so}"
        # one update kernel per rule: update(UpdateArgs const&, <Rule>::Hyper const&)
        updates = set(re.findall(rf"<fastopt::cpu::{ns}::update\(fastopt::cpu::UpdateArgs const&, "
                                 rf"fastopt::(\w+)::Hyper const&\)>:", listing))
        assert {u.lower() for u in updates} == set(rules), f"{ns}: update kernels of {updates}, rules {set(rules)}"
