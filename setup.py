"""Build fastseg._C: C++ CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

FASTSEG_CUDA=0|1 forces the CUDA part off/on; TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0+PTX;
MAX_JOBS is honoured by torch's ninja build.
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def find_cuda_home():
    """The real toolkit root. `nvcc` on PATH may be a wrapper script outside the toolkit
    (then torch's guess, dirname(dirname(nvcc)), is wrong and linking fails with
    `cannot find -lcudart`); `nvcc --dryrun` prints the toolkit root as TOP=."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.realpath(root)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), os.pardir))


CUDA_ROOT = find_cuda_home()
if CUDA_ROOT:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import time.
    os.environ["CUDA_HOME"] = CUDA_ROOT
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    flag = os.environ.get("FASTSEG_CUDA")
    possible = CUDA_ROOT is not None and torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not possible:
            raise RuntimeError(
                f"FASTSEG_CUDA=1 but no CUDA build is possible: toolkit={CUDA_ROOT}, "
                f"torch.version.cuda={torch.version.cuda}"
            )
        return True
    return possible


def write_build_info(with_cuda):
    archs = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else ""
    info = {
        "version": VERSION,
        "torch": torch.__version__.split("+")[0],
        "torch_full": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "cuda_archs": archs,
        "compiled_backends": ["cpu", "cuda"] if with_cuda else ["cpu"],
        "cuda_skipped": None if with_cuda else (
            "FASTSEG_CUDA=0" if os.environ.get("FASTSEG_CUDA") == "0" else "no CUDA toolkit or CPU-only torch"),
    }
    with open(os.path.join(ROOT, "fastseg", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time; do not edit.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


VERSION = "0.1.0"
WITH_CUDA = want_cuda()
write_build_info(WITH_CUDA)

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp"))
define_macros = [("FASTSEG_TORCH_VERSION", f'"{torch.__version__.split("+")[0]}"')]
cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
extra_link = ["-fopenmp"]
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/ops/cuda/*.cu"))
    define_macros.append(("FASTSEG_WITH_CUDA", "1"))
    ext = CUDAExtension(
        "fastseg._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]},
        extra_link_args=extra_link,
    )
else:
    ext = CppExtension(
        "fastseg._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=extra_link,
    )

setup(
    name="fastseg",
    version=VERSION,
    packages=find_packages(include=["fastseg", "fastseg.*"]) + ["fastseg.triton_kernels"],
    package_dir={"fastseg.triton_kernels": "triton_kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["fastseg=fastseg.cli:main"]},
    python_requires=">=3.10",
)
