"""The compiled extension, its build metadata, and `python -m fastseg.info`."""

from __future__ import annotations

import shutil
import subprocess
import sys

import torch

from fastseg import _extension, info


def test_extension_loaded_and_matches_running_torch():
    assert _extension.has_ops(), _extension.load_error()
    build = _extension.build_info()
    assert build["torch"] == torch.__version__.split("+")[0]
    assert "cpu" in build["compiled_backends"]
    compiled = torch.ops.fastseg._build_info()
    assert f"torch={build['torch']};" in compiled
    assert compiled.endswith("cuda=1") == ("cuda" in build["compiled_backends"])


def test_cuda_part_was_compiled_when_a_toolkit_is_present():
    """The CUDA kernels are compiled whenever torch has CUDA and nvcc exists, GPU or not,
    unless the build was told FASTSEG_CUDA=0."""
    build = _extension.build_info()
    if torch.version.cuda and shutil.which("nvcc"):
        assert "cuda" in build["compiled_backends"] or build["cuda_skipped"] == "FASTSEG_CUDA=0", build


def test_info_reports_backends_and_reasons():
    data = info.collect()
    assert data["extension_loaded"] is True
    assert "separable_conv2d" in data["available_backends"]
    assert set(data["backend_status"]["separable_conv2d"]) == {"reference", "cpu", "cuda", "triton"}
    out = subprocess.run([sys.executable, "-m", "fastseg.info"], capture_output=True, text=True, check=True)
    assert "separable_conv2d" in out.stdout and "built for torch" in out.stdout
