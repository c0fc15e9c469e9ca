"""fastseg: fused kernels and classic segmentation architectures for PyTorch."""

import os as _os

# A source checkout keeps the Triton kernels in ../triton_kernels; wheels install them as
# fastseg/triton_kernels. Extending __path__ makes `fastseg.triton_kernels` import in both.
_src_triton = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "triton_kernels")
if _os.path.isdir(_src_triton) and not _os.path.isdir(_os.path.join(__path__[0], "triton_kernels")):
    __path__.append(_os.path.dirname(_src_triton))

from fastseg import ops  # noqa: E402
from fastseg._version import __version__  # noqa: E402
__all__ = ["ops", "__version__"]
