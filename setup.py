"""Build fastseg._C: C++ CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

FASTSEG_CUDA=0|1 forces the CUDA part off/on; TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0+PTX;
MAX_JOBS is honoured by torch's ninja build. FASTSEG_PREBUILT=1 packages the fastseg/_C*.so and
fastseg/_build_info.py already built in the tree (by `make build` / `build_ext --inplace`) instead of
compiling again: `make wheel-test` uses it so that CI does not compile twice.

The wheel pins the torch it was built for (Requires-Dist: torch==<version>; the C++ ABI is
torch-version specific) and carries fastseg/_build_info.py (torch, CUDA, archs, compiled backends),
which `python -m fastseg.info` prints and which fastseg checks against the running torch on import.
"""

import glob
import os
import re
import runpy
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


def read_version():
    with open(os.path.join(ROOT, "fastseg", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def prebuilt():
    """The in-tree fastseg/_C*.so to package as is (FASTSEG_PREBUILT=1), checked against the running torch."""
    if os.environ.get("FASTSEG_PREBUILT") != "1":
        return None
    libs = glob.glob(os.path.join(ROOT, "fastseg", "_C*.so"))
    info_path = os.path.join(ROOT, "fastseg", "_build_info.py")
    if len(libs) != 1 or not os.path.exists(info_path):
        raise RuntimeError(f"FASTSEG_PREBUILT=1 needs one built fastseg/_C*.so and fastseg/_build_info.py, "
                           f"found {libs}")
    info = runpy.run_path(info_path)["BUILD_INFO"]
    if info.get("torch") != torch.__version__.split("+")[0] or info.get("version") != VERSION:
        raise RuntimeError(f"FASTSEG_PREBUILT=1: the in-tree build is for fastseg {info.get('version')} / torch "
                           f"{info.get('torch')}, this is fastseg {VERSION} / torch {torch.__version__}: rebuild it")
    return libs[0], info


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, or with FASTSEG_PREBUILT=1 a copy of the in-tree build."""

    def run(self):
        # the build info belongs to the build (not to `sdist` or `egg_info`): written here, and into
        # build_lib too, since build_py has already copied the package's modules there
        if PREBUILT is None:
            write_build_info(WITH_CUDA)
            if not self.inplace:
                self.copy_file(os.path.join(ROOT, "fastseg", "_build_info.py"),
                               os.path.join(self.build_lib, "fastseg", "_build_info.py"))
        super().run()

    def build_extension(self, ext):
        if PREBUILT is None:
            return super().build_extension(ext)
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.abspath(PREBUILT[0]) != os.path.abspath(target):
            shutil.copyfile(PREBUILT[0], target)


VERSION = read_version()
PREBUILT = prebuilt()
if PREBUILT is None:
    WITH_CUDA = want_cuda()
else:
    WITH_CUDA = "cuda" in PREBUILT[1]["compiled_backends"]

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
    cmdclass={"build_ext": BuildExt},
    install_requires=[f"torch=={torch.__version__.split('+')[0]}"],
    description="Fused CUDA, Triton and C++ kernels and classic segmentation architectures for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    entry_points={"console_scripts": ["fastseg=fastseg.cli:main"]},
    python_requires=">=3.10",
)
