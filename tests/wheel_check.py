"""Install a built fastseg wheel into a temporary target and use it from outside the source tree.

    python tests/wheel_check.py dist/fastseg-0.1.0-cp311-cp311-linux_x86_64.whl

Checks: the wheel holds fastseg._C, fastseg/_build_info.py and the Triton kernels; its metadata pins
the torch it was built for and carries fastseg's one version; ``pip install --no-deps --target`` works;
from a directory outside the tree, ``import fastseg`` loads that copy (not the checkout), its compiled
operators load, and ``separable_conv2d`` and ``position_attention`` run on every compiled backend usable
on this machine (``cpu``; ``cuda`` and ``triton`` where a GPU is visible) and match the reference
backend; with a build-info that claims another torch, importing gives fastseg's clear message.
Not collected by pytest (run by ``make wheel-test``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile

_USE = r"""
import os, sys, torch
import fastseg
from fastseg import _extension, ops
site = sys.argv[1]
assert fastseg.__file__.startswith(site), f"imported {fastseg.__file__}, not the installed wheel under {site}"
assert _extension.has_ops(), _extension.load_error()
info = _extension.build_info()
assert info["version"] == fastseg.__version__, (info, fastseg.__version__)
import fastseg.triton_kernels
assert fastseg.triton_kernels.__path__[0].startswith(site), fastseg.triton_kernels.__path__
g = torch.Generator().manual_seed(0)
ran = []
for op, backends in sorted(ops.available_backends().items()):
    if op not in ("separable_conv2d", "position_attention"):
        continue
    for backend in backends:
        if backend == "reference":
            continue
        dev = "cpu" if backend == "cpu" else "cuda"
        if op == "separable_conv2d":
            args = (torch.randn(2, 8, 13, 11, generator=g), torch.randn(8, 1, 3, 3, generator=g),
                    torch.randn(5, 8, 1, 1, generator=g))
            kw = {"dilation": 2, "relu": True}
        else:
            args = (torch.randn(2, 4, 7, 5, generator=g), torch.randn(2, 4, 7, 5, generator=g),
                    torch.randn(2, 6, 7, 5, generator=g))
            kw = {}
        args = tuple(a.to(dev) for a in args)
        out = getattr(ops, op)(*args, backend=backend, **kw)
        ref = getattr(ops, op)(*args, backend="reference", **kw)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        ran.append(f"{op}[{backend}]")
assert any(r.endswith("[cpu]") for r in ran), ran
print("fastseg", fastseg.__version__, "from", os.path.dirname(fastseg.__file__))
print("built for", {k: info[k] for k in ("torch", "cuda", "cuda_archs", "compiled_backends")})
print("ran:", ", ".join(ran))
"""

_MISMATCH = r"""
import sys, torch
from fastseg import _extension
err = _extension.load_error()
claimed = sys.argv[2]
assert not _extension.has_ops() and err and f"torch {claimed}" in err, err
print(f"under torch {torch.__version__}:", err)
"""


def _run(code: str, site: str, cwd: str, *args: str, python: str = sys.executable) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTSEG_BACKEND")}
    env["PYTHONPATH"] = site
    proc = subprocess.run([python, "-c", code, site, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"wheel check failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def check(wheel: str, other_python: str | None = None) -> None:
    import torch

    names = zipfile.ZipFile(wheel).namelist()
    for want in ("fastseg/_build_info.py", "fastseg/_version.py", "fastseg/triton_kernels/separable_conv2d.py",
                 "fastseg/nn/fuse.py"):
        assert want in names, f"{want} missing from {wheel}"
    assert any(n.startswith("fastseg/_C") and n.endswith(".so") for n in names), f"no fastseg/_C*.so in {wheel}"
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    torch_pin = f"Requires-Dist: torch=={torch.__version__.split('+')[0]}"
    assert torch_pin in metadata, f"{meta} does not pin the torch it was built for ({torch_pin})"
    with tempfile.TemporaryDirectory() as tmp:
        site = os.path.join(tmp, "site")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel],
                       check=True)
        print(_run(_USE, site, tmp), end="")
        built_for = torch.__version__.split("+")[0]
        if other_python:  # a real other torch: fastseg._C cannot load there, the message says why
            print(_run(_MISMATCH, site, tmp, built_for, python=other_python), end="")
        info = os.path.join(site, "fastseg", "_build_info.py")  # a build that claims another torch
        with open(info) as f:
            text = f.read()
        with open(info, "w") as f:
            f.write(text.replace(f"'torch': '{built_for}'", "'torch': '0.0.1'"))
        print(_run(_MISMATCH, site, tmp, "0.0.1"), end="")
    print(f"ok: {os.path.basename(wheel)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel")
    parser.add_argument("--other-python", help="a Python with another torch (the device twin's): importing the "
                                               "wheel there must give fastseg's clear message")
    args = parser.parse_args()
    check(args.wheel, args.other_python)


if __name__ == "__main__":
    main()
