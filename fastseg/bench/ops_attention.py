"""``position_attention`` / ``channel_attention`` cases: DANet head, ResNet-101 at output stride 8
(C = 512, Ck = 64)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastseg import ops
from fastseg.bench.cases import Case, Inputs, grad_step, nbytes, register_op
from fastseg.ops import _reference

__all__ = ["channel_attention_cases", "position_attention_cases"]

# (name, input side): the feature map is 1/8 of the input.
_DANET_SIZES = (("danet_512", 512), ("danet_768", 768), ("danet_1024", 1024))
_DANET_TRAIN = ("danet_512", "danet_768")  # forward+backward; at 1024 the eager N×N is 1 GB per image
_PAM_WRT, _CAM_WRT = ("q", "k", "v"), ("x",)


def _attention_inputs(op: str, side: int, batch: int, train: bool) -> Callable[[torch.device, torch.dtype], Inputs]:
    c, ck, hw = 512, 64, side // 8

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(side * 31 + batch + len(op))

        def rnd(*shape: int, scale: float = 1.0) -> Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        if op == "position_attention":
            # 1x1-conv queries/keys of unit-variance features: energies of a few tens, as in DANet.
            inputs: Inputs = {"q": rnd(batch, ck, hw, hw, scale=ck ** -0.25),
                              "k": rnd(batch, ck, hw, hw, scale=ck ** -0.25), "v": rnd(batch, c, hw, hw)}
        else:
            inputs = {"x": rnd(batch, c, hw, hw, scale=c ** -0.5 * 2)}
        if train:
            inputs["grad_out"] = rnd(batch, c, hw, hw)
            for n in (_PAM_WRT if op == "position_attention" else _CAM_WRT):
                inputs[n].requires_grad_(True)
        return inputs
    return make


def _attention_case(op: str, name: str, side: int, batch: int, train: bool, quick: bool,
                    eager: str | None = None) -> Case:
    """``eager``: the baseline's name in ``fastseg.ops._reference`` (default: the op's own)."""
    c, ck, hw = 512, 64, side // 8
    n = hw * hw
    names = _PAM_WRT if op == "position_attention" else _CAM_WRT  # the op's tensor inputs, in order

    def baseline(inputs: Inputs) -> Tensor:
        return getattr(_reference, eager or op)(*(inputs[k] for k in names))

    def run(inputs: Inputs, backend: str) -> Tensor:
        return getattr(ops, op)(*(inputs[k] for k in names), backend=backend)

    def fwd_bytes(inputs: Inputs) -> int:
        return nbytes(*(inputs[k] for k in names)) + batch * c * n * next(iter(inputs.values())).element_size()

    def fwd_flops(inputs: Inputs) -> float:
        if op == "position_attention":
            return float(batch * (2 * n * n * ck + 2 * n * n * c))
        return float(batch * 4 * c * c * n)

    params: dict[str, Any] = {"layer": f"DANet head at {side}x{side} (ResNet-101, OS8)", "N": batch, "C": c,
                              "H": hw, "W": hw, "shape": f"{batch}x{c}x{hw}x{hw}",
                              "baseline": f"_reference.{eager or op}"}
    if op == "position_attention":
        params.update(Ck=ck, shape=f"{batch}x[{ck},{ck},{c}]x{hw}x{hw}")
    make = _attention_inputs(op, side, batch, train)
    if not train:
        return Case(op, name, "fwd", params, make, baseline, run, fwd_bytes, fwd_flops, quick)
    return Case(op, name + "_train", "fwd+bwd", {**params, "wrt": list(names)}, make,
                grad_step(lambda i: baseline(i), names), grad_step(run, names),
                lambda i: 2 * fwd_bytes(i), lambda i: 3.5 * fwd_flops(i), quick)


def _danet_cases(op: str, batch: int) -> list[Case]:
    cases = [_attention_case(op, name, side, batch, False, name == "danet_512") for name, side in _DANET_SIZES]
    return cases + [_attention_case(op, name, side, batch, True, False)
                    for name, side in _DANET_SIZES if name in _DANET_TRAIN]


@register_op("position_attention")
def position_attention_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """DANet PAM at 1/8 of 512², 768², 1024² inputs (N = 64², 96², 128²; C = 512, Ck = 64): forward,
    and forward+backward at 512² and 768², against the eager formulation; the 768² ones (forward and
    forward+backward) and the 512² forward+backward also against ``F.scaled_dot_product_attention``
    (scale=1) on the same tensors."""
    op, sdpa = "position_attention", "position_attention_sdpa"
    return _danet_cases(op, batch) + [
        _attention_case(op, "danet_768_vs_sdpa", 768, batch, train, False, eager=sdpa) for train in (False, True)] + [
        _attention_case(op, "danet_512_vs_sdpa", 512, batch, True, False, eager=sdpa)]


@register_op("channel_attention")
def channel_attention_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """DANet CAM on the same feature maps (C = 512)."""
    return _danet_cases("channel_attention", batch)
