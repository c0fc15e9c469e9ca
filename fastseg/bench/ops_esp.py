"""``esp_pyramid`` cases: ESPNet's ESP modules at a 1024x512 (Cityscapes) input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastseg import ops
from fastseg.bench.cases import Case, Inputs, grad_step, nbytes, register_op
from fastseg.ops import _reference

__all__ = ["esp_pyramid_cases"]

_DILATIONS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class _EspShape:
    name: str
    layer: str
    n_out: int  # the module's width: d = n_out // 5 reduced channels, first branch n_out - 4d
    h: int
    w: int
    quick: bool = False

    @property
    def d(self) -> int:
        return self.n_out // 5

    @property
    def d1(self) -> int:
        return self.n_out - 4 * self.d


# A 1024x512 input: level 2 runs at 1/4 (256x128), level 3 at 1/8 (128x64). The strided module of a
# level and its plain modules run the same pyramid (only their reduction differs).
_ESP_SHAPES: tuple[_EspShape, ...] = (
    _EspShape("espnet_level2", "ESPNet level 2 ESP module (64 -> d 12, first branch 16), 1/4 of 1024x512",
              64, 128, 256, quick=True),
    _EspShape("espnet_level3", "ESPNet level 3 ESP module (128 -> d 25, first branch 28), 1/8 of 1024x512",
              128, 64, 128, quick=True),
    _EspShape("espnet_decoder", "ESPNet decoder ESP module (20 classes -> d 4), 1/4 of 1024x512", 20, 128, 256),
)
_ESP_TRAIN = {"espnet_level2": False, "espnet_level3": True}
_WRT = ("x", "w0", "w1", "w2", "w3", "w4")


def _inputs(s: _EspShape, batch: int, train: bool) -> Callable[[torch.device, torch.dtype], Inputs]:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(sum(map(ord, s.name)) * 7919 + batch)

        def rnd(*shape: int, scale: float = 1.0) -> Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        inputs: Inputs = {"x": rnd(batch, s.d, s.h, s.w)}
        for k in range(len(_DILATIONS)):
            inputs[f"w{k}"] = rnd(s.d1 if k == 0 else s.d, s.d, 3, 3, scale=(9 * s.d) ** -0.5)
        if train:
            inputs["grad_out"] = rnd(batch, s.n_out, s.h, s.w)
            for n in _WRT:
                inputs[n].requires_grad_(True)
        return inputs
    return make


def _weights(inputs: Inputs) -> list[Tensor]:
    return [inputs[f"w{k}"] for k in range(len(_DILATIONS))]


def _case(s: _EspShape, batch: int, train: bool, quick: bool) -> Case:
    def baseline(inputs: Inputs) -> Tensor:
        # The PyTorch composition (five convs, four adds, a concat), imported, never re-typed.
        return _reference.esp_pyramid(inputs["x"], _weights(inputs), dilations=_DILATIONS)

    def run(inputs: Inputs, backend: str) -> Tensor:
        return ops.esp_pyramid(inputs["x"], _weights(inputs), dilations=_DILATIONS, backend=backend)

    def fwd_bytes(inputs: Inputs) -> int:
        x = inputs["x"]
        return nbytes(x, *_weights(inputs)) + batch * s.n_out * s.h * s.w * x.element_size()

    def fwd_flops(inputs: Inputs) -> float:
        return float(batch * s.h * s.w * (2 * 9 * s.d * s.n_out + 3 * s.d))  # the convs + the sums

    params: dict[str, Any] = {
        "layer": s.layer, "N": batch, "C": s.d, "O": s.n_out, "H": s.h, "W": s.w, "d1": s.d1,
        "dilations": list(_DILATIONS),
        "shape": f"{batch}x{s.d}x{s.h}x{s.w}->{s.n_out} (5 branches, first {s.d1})",
    }
    if not train:
        return Case("esp_pyramid", s.name, "fwd", params, _inputs(s, batch, False), baseline, run,
                    fwd_bytes, fwd_flops, quick)

    def train_bytes(inputs: Inputs) -> int:
        return fwd_bytes(inputs) + nbytes(inputs["grad_out"], *(inputs[n] for n in _WRT))

    def train_flops(inputs: Inputs) -> float:
        return 3.0 * fwd_flops(inputs)

    return Case("esp_pyramid", s.name + "_train", "fwd+bwd", {**params, "wrt": list(_WRT)},
                _inputs(s, batch, True), grad_step(baseline, _WRT), grad_step(run, _WRT),
                train_bytes, train_flops, quick)


@register_op("esp_pyramid")
def esp_pyramid_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """ESPNet at 1024x512: the level-2 (1/4, d 12 -> 64) and level-3 (1/8, d 25 -> 128) pyramids and the
    decoder's (d 4 -> 20), forward; forward+backward (grads of x and the five weights) on levels 2 and 3.
    ``quick`` marks the CI subset."""
    cases = [_case(s, batch, False, s.quick) for s in _ESP_SHAPES]
    by_name = {s.name: s for s in _ESP_SHAPES}
    cases += [_case(by_name[n], batch, True, q) for n, q in _ESP_TRAIN.items()]
    return cases
