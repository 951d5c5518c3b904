"""Build of fastopt and its compiled part ``fastopt._C`` (described here once, built with ninja).

* The C++ (CPU) sources always build; the CUDA sources build when torch has CUDA and nvcc exists
  (architectures from TORCH_CUDA_ARCH_LIST, else the visible GPU's).
* FASTOPT_NO_EXT=1 skips the compiled part. If it fails to build, the package installs without it
  and runs on the reference backend, unless FASTOPT_REQUIRE_EXT=1 (set by `make`), which makes
  the failure an error.
* The C++ kernels are compiled for the building machine's CPU (-march=native; the extension is
  built where it runs). FASTOPT_MARCH=x86-64-v3 (say) picks another target, for a build that
  has to run on other machines.
* Install with `pip install --no-build-isolation -e .`: the build needs the torch you run with.
* FASTOPT_SANITIZE=address builds the C++ part (CPU only) with AddressSanitizer, for `make asan`
  (run under LD_PRELOAD of libasan, as the Makefile does).
* The CUDA toolkit is the one of $CUDA_HOME, else of the nvcc on PATH as nvcc itself reports it
  (an `nvcc` on PATH may be a wrapper script far from the toolkit); without one, the CUDA part is
  skipped with a message.
"""

import glob
import os
import re
import shutil
import subprocess
import tempfile
import warnings

from setuptools import find_packages, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _is_toolkit(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit's root: $CUDA_HOME (or $CUDA_PATH), else the folder above the directory
    nvcc runs from, as `nvcc --dryrun` prints it (`_HERE_=`); None when there is no toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if _is_toolkit(os.environ[var]) else None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    here = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    home = os.path.realpath(os.path.join(here.group(1), "..")) if here else None
    return home if _is_toolkit(home) else None


ext_modules, cmdclass = [], {}
if not _flag("FASTOPT_NO_EXT"):
    import torch

    sanitize = os.environ.get("FASTOPT_SANITIZE", "")
    cuda_home = find_cuda_home() if torch.version.cuda is not None and not sanitize else None
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when imported
    elif torch.version.cuda is not None:
        print("fastopt: torch has CUDA but no CUDA toolkit was found (set CUDA_HOME, or put nvcc on "
              "PATH): building the CPU part only")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    root = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(cuda_sources) and cuda_home is not None
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # no visible GPU: Ampere and Hopper
    common = dict(
        include_dirs=[os.path.join(root, "csrc", "include")],
        # -fno-math-errno: sqrt must not set errno, or the update loops cannot be vectorized.
        # -fopenmp: at::parallel_for is an inline OpenMP loop in torch's headers; without the flag
        # the pragma is dropped and every op runs on one thread. libgomp resolves to torch's own.
        # -mprefer-vector-width=512: where the CPU has AVX-512, fewer instructions per element
        # (~3% on a memory-bound step; ignored on CPUs without it).
        extra_compile_args={
            "cxx": ["-O3", "-fno-math-errno", "-fopenmp", "-mprefer-vector-width=512",
                    f"-march={os.environ.get('FASTOPT_MARCH', 'native')}"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr"],
        },
        extra_link_args=["-fopenmp"],
    )
    if sanitize:  # an instrumented CPU build; -O1 keeps reports readable, frames kept for stacks
        flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
        common["extra_compile_args"]["cxx"] = [f for f in common["extra_compile_args"]["cxx"] if f != "-O3"]
        common["extra_compile_args"]["cxx"] += ["-O1"] + flags
        common["extra_link_args"] = common["extra_link_args"] + flags
    if with_cuda:
        ext = CUDAExtension(
            "fastopt._C", sources + cuda_sources, define_macros=[("FASTOPT_WITH_CUDA", None)], **common
        )
    else:
        common["extra_compile_args"] = common["extra_compile_args"]["cxx"]
        ext = CppExtension("fastopt._C", sources, **common)
    ext_modules = [ext]

    class BuildExt(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure
                if _flag("FASTOPT_REQUIRE_EXT"):
                    raise
                warnings.warn(
                    f"fastopt._C was not built ({exc}); fastopt will run on the reference backend"
                )

    cmdclass = {"build_ext": BuildExt.with_options(use_ninja=True)}

setup(
    packages=find_packages(include=["fastopt", "fastopt.*"]) + ["fastopt.triton_kernels"],
    package_dir={"fastopt.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
