"""``dense_crf`` cases: DeepLab's CRF post-processing of a 21-class (PASCAL VOC) output."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastseg import ops
from fastseg.bench.cases import Case, Inputs, register_op
from fastseg.ops import _reference

__all__ = ["dense_crf_cases"]


def _crf_inputs(side: int, batch: int) -> Callable[[torch.device, torch.dtype], Inputs]:
    """scikit-image's astronaut photo (resized to side x side; copies for a batch, each with its own unary)
    and the -log softmax of a coarse (1/16) random 21-class score map plus pixel noise."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        import numpy as np
        import skimage.data
        import skimage.transform

        g = torch.Generator().manual_seed(side + batch)
        img = skimage.transform.resize(skimage.data.astronaut(), (side, side), preserve_range=True, anti_aliasing=True)
        image = torch.from_numpy(np.ascontiguousarray(img.round().astype(np.uint8))).permute(2, 0, 1)
        coarse = torch.randn(batch, 21, side // 16, side // 16, generator=g) * 2
        logits = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
        unary = -torch.log_softmax(logits + torch.randn(batch, 21, side, side, generator=g), 1)
        return {"unary": unary.to(device=device, dtype=dtype),
                "image": image.expand(batch, -1, -1, -1).contiguous().to(device)}
    return make


def _crf_baseline() -> tuple[str, Callable[..., Tensor]]:
    """pydensecrf when installed (`make bench` installs it), else the pure-PyTorch lattice."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return "_reference.dense_crf (pydensecrf not installed)", _reference.dense_crf
    return "pydensecrf", _reference.dense_crf_pydensecrf


@register_op("dense_crf")
def dense_crf_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """Dense CRF mean field (pydensecrf's default parameters, 21 labels): a 512x512 photo with 5 and 10
    iterations, and a batch of 8 at 321x321 (DeepLab's crop), 10 iterations, against pydensecrf (whole call,
    lattice construction included)."""
    base_name, base_fn = _crf_baseline()
    cases = []
    for name, side, n, iterations, q in (("photo_512_it5", 512, batch, 5, False),
                                         ("photo_512_it10", 512, batch, 10, False),
                                         ("batch8_321_it10", 321, 8 * batch, 10, False),
                                         ("photo_128_it5", 128, batch, 5, True)):
        def baseline(i: Inputs, iterations: int = iterations) -> Tensor:
            return base_fn(i["unary"], i["image"], iterations=iterations)

        def run(i: Inputs, backend: str, iterations: int = iterations) -> Tensor:
            return ops.dense_crf(i["unary"], i["image"], iterations=iterations, backend=backend)

        params = {"layer": "DeepLab CRF post-processing (VOC, 21 labels)", "N": n, "C": 21, "H": side, "W": side,
                  "iterations": iterations, "shape": f"{n}x21x{side}x{side}", "baseline": base_name}
        cases.append(Case("dense_crf", name, "fwd", params, _crf_inputs(side, n), baseline, run, None, None, q))
    return cases
