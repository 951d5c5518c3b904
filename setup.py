"""Packaging of fastopt; its compiled part ``fastopt._C`` is described in CMakeLists.txt and built
here through CMake and ninja.

* The C++ (CPU) part always builds, for the baseline of the architecture with the hot kernels once
  per CPU capability (Note [CPU capabilities], CMakeLists.txt): a wheel runs on any CPU of its
  architecture. The CUDA part builds when torch has CUDA and a CUDA toolkit is found.
* FASTOPT_NO_EXT=1 skips the compiled part. If it fails to build, the package installs without it
  and runs on the reference backend, unless FASTOPT_REQUIRE_EXT=1 (set by `make`), which makes
  the failure an error.
* Install with `pip install --no-build-isolation -e .`: the build needs the torch you run with
  (and cmake and ninja, from the package index or the system).
* FASTOPT_SANITIZE=address builds the C++ part (CPU only) with AddressSanitizer, for `make asan`
  (run under LD_PRELOAD of libasan, as the Makefile does).
* The CUDA toolkit is the one of $CUDA_HOME, else of the nvcc on PATH as nvcc itself reports it
  (an `nvcc` on PATH may be a wrapper script far from the toolkit); without one, the CUDA part is
  skipped with a message. MAX_JOBS caps the parallel compile jobs.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _tool(module: str, name: str):
    """A build tool from its package on the index (cmake, ninja) when installed, else from PATH."""
    try:
        mod = __import__(module)
        path = os.path.join(mod.BIN_DIR if module == "ninja" else mod.CMAKE_BIN_DIR, name)
        if os.path.isfile(path):
            return path
    except (ImportError, AttributeError):
        pass
    return shutil.which(name)


class CMakeBuild(build_ext):
    """Builds fastopt._C with CMake (configure once per build folder, then incremental builds)."""

    def build_extension(self, ext):
        try:
            self._build(ext)
        except (OSError, subprocess.CalledProcessError) as exc:
            if _flag("FASTOPT_REQUIRE_EXT"):
                raise
            warnings.warn(f"fastopt._C was not built ({exc}); fastopt will run on the reference backend")

    def _build(self, ext):
        import torch

        cmake = _tool("cmake", "cmake")
        if cmake is None:
            raise OSError("cmake was not found (pip install cmake)")
        sanitize = os.environ.get("FASTOPT_SANITIZE", "")
        cuda_home = find_cuda_home() if torch.version.cuda is not None and not sanitize else None
        if cuda_home is None and torch.version.cuda is not None and not sanitize:
            print("fastopt: torch has CUDA but no CUDA toolkit was found (set CUDA_HOME, or put nvcc on "
                  "PATH): building the CPU part only")
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        # in place or editable (`pip install -e .`): a build folder in the tree, reused by the next
        # build (incremental); else (a wheel) setuptools' temporary one
        in_tree = self.inplace or getattr(self, "editable_mode", False)
        build_dir = (os.path.join(ROOT, "build", f"cmake-{sysconfig.get_config_var('SOABI') or 'py'}")
                     if in_tree else os.path.join(os.path.abspath(self.build_temp), "cmake"))
        args = [f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                f"-DFASTOPT_SANITIZE={sanitize}", f"-DFASTOPT_WITH_CUDA={'ON' if cuda_home else 'OFF'}"]
        ninja = _tool("ninja", "ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if cuda_home:
            args.append(f"-DCMAKE_CUDA_COMPILER={os.path.join(cuda_home, 'bin', 'nvcc')}")
        subprocess.check_call([cmake, "-S", ROOT, "-B", build_dir, *args])
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", build_dir, "-j", jobs])


ext_modules, cmdclass = [], {}
if not _flag("FASTOPT_NO_EXT"):
    ext_modules = [Extension("fastopt._C", sources=[])]  # the sources are CMakeLists.txt's
    cmdclass = {"build_ext": CMakeBuild}

setup(
    packages=find_packages(include=["fastopt", "fastopt.*"]) + ["fastopt.triton_kernels"],
    package_dir={"fastopt.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
