"""``separable_conv2d`` cases: DeepLabv3+ (513x513 input) ASPP, decoder and Aligned Xception-65 layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastseg import ops
from fastseg.bench.cases import Case, Inputs, grad_step, nbytes, register_op
from fastseg.ops import _reference
from fastseg.ops._reference import conv_out_size, fixed_padding

__all__ = ["separable_conv2d_cases"]


@dataclass(frozen=True)
class _SepConvShape:
    name: str
    layer: str
    c: int
    o: int
    h: int
    w: int
    stride: int = 1
    dilation: int = 1
    k: int = 3
    quick: bool = False


# Feature maps of a 513x513 input: stride 2 -> 257, 4 -> 129, 8 -> 65, 16 -> 33, 32 -> 17.
# Every separable conv of DeepLabv3+ has BatchNorm + ReLU after the depthwise and after the pointwise
# stage; in eval mode the BatchNorms fold into the per-channel affines (dw_/pw_scale, dw_/pw_shift).
_SEPCONV_SHAPES: tuple[_SepConvShape, ...] = (
    _SepConvShape("aspp_os16_r6", "ASPP separable branch, OS16, rate 6", 2048, 256, 33, 33, dilation=6),
    _SepConvShape("aspp_os16_r12", "ASPP separable branch, OS16, rate 12", 2048, 256, 33, 33, dilation=12,
                  quick=True),
    _SepConvShape("aspp_os16_r18", "ASPP separable branch, OS16, rate 18", 2048, 256, 33, 33, dilation=18),
    _SepConvShape("aspp_os8_r12", "ASPP separable branch, OS8, rate 12", 2048, 256, 65, 65, dilation=12),
    _SepConvShape("aspp_os8_r24", "ASPP separable branch, OS8, rate 24", 2048, 256, 65, 65, dilation=24),
    _SepConvShape("aspp_os8_r36", "ASPP separable branch, OS8, rate 36", 2048, 256, 65, 65, dilation=36),
    _SepConvShape("xception_entry_b1", "Xception-65 entry flow block 1, 1st sepconv", 64, 128, 257, 257),
    _SepConvShape("xception_entry_b1_128", "Xception-65 entry flow block 1, 2nd sepconv", 128, 128, 257, 257),
    _SepConvShape("xception_entry_b1_s2", "Xception-65 entry flow block 1, 3rd sepconv (stride 2, 257->129)",
                  128, 128, 257, 257, stride=2, quick=True),
    _SepConvShape("xception_entry_b2", "Xception-65 entry flow block 2, 1st sepconv", 128, 256, 129, 129),
    _SepConvShape("xception_entry_b2_256", "Xception-65 entry flow block 2, 2nd sepconv", 256, 256, 129, 129),
    _SepConvShape("xception_entry_b3", "Xception-65 entry flow block 3, 1st sepconv", 256, 728, 65, 65),
    _SepConvShape("xception_entry_b3_728", "Xception-65 entry flow block 3, 2nd sepconv", 728, 728, 65, 65),
    _SepConvShape("xception_entry_b3_s2", "Xception-65 entry flow block 3, 3rd sepconv (stride 2, 65->33)",
                  728, 728, 65, 65, stride=2),
    _SepConvShape("xception_middle_os16", "Xception-65 middle flow sepconv, OS16", 728, 728, 33, 33, quick=True),
    _SepConvShape("xception_exit_728_1024_os16", "Xception-65 exit flow block 1, 2nd sepconv, OS16",
                  728, 1024, 33, 33),
    _SepConvShape("xception_exit_1024_1536_os16", "Xception-65 exit flow block 2, 1st sepconv, OS16 (rate 2)",
                  1024, 1536, 33, 33, dilation=2),
    _SepConvShape("xception_exit_1536_2048_os16", "Xception-65 exit flow block 2, 3rd sepconv, OS16 (rate 2)",
                  1536, 2048, 33, 33, dilation=2),
    _SepConvShape("xception_exit_1024_1536_os32", "Xception-65 exit flow block 2, 1st sepconv, OS32",
                  1024, 1536, 17, 17),
    _SepConvShape("xception_exit_1536_2048_os32", "Xception-65 exit flow block 2, 3rd sepconv, OS32",
                  1536, 2048, 17, 17),
    # Decoder at output stride 4 (129x129): the upsampled ASPP output (256) concatenated with the
    # 48-channel projection of the low-level features, then two 3x3 separable convs of 256.
    _SepConvShape("decoder_1", "DeepLabv3+ decoder, 1st sepconv (256 + 48 -> 256)", 304, 256, 129, 129),
    _SepConvShape("decoder_2", "DeepLabv3+ decoder, 2nd sepconv", 256, 256, 129, 129),
)
# Every shape also runs forward + backward (train-style: grads of x, dw_weight, pw_weight); these
# train cases are in the quick subset.
_SEPCONV_TRAIN_QUICK = ("aspp_os16_r12",)
_SEPCONV_WRT = ("x", "dw_weight", "pw_weight")


def _sepconv_inputs(s: _SepConvShape, batch: int, train: bool) -> Callable[[torch.device, torch.dtype], Inputs]:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(sum(map(ord, s.name)) * 7919 + batch)

        def rnd(*shape: int, scale: float = 1.0, shift: float = 0.0, uniform: bool = False) -> Tensor:
            t = torch.rand(*shape, generator=g) if uniform else torch.randn(*shape, generator=g)
            return (t * scale + shift).to(device=device, dtype=dtype)

        inputs: Inputs = {
            "x": rnd(batch, s.c, s.h, s.w),
            "dw_weight": rnd(s.c, 1, s.k, s.k, scale=1.0 / s.k),
            "pw_weight": rnd(s.o, s.c, 1, 1, scale=s.c ** -0.5),
            # Folded BatchNorms: scale around 1, small shift.
            "dw_scale": rnd(s.c, scale=0.5, shift=0.75, uniform=True),
            "dw_shift": rnd(s.c, scale=0.1),
            "pw_scale": rnd(s.o, scale=0.5, shift=0.75, uniform=True),
            "pw_shift": rnd(s.o, scale=0.1),
        }
        if train:
            beg, end = fixed_padding(s.k, s.dilation, "same")
            ho = conv_out_size(s.h, beg, end, s.k, s.dilation, s.stride)
            wo = conv_out_size(s.w, beg, end, s.k, s.dilation, s.stride)
            inputs["grad_out"] = rnd(batch, s.o, ho, wo)
            for n in _SEPCONV_WRT:
                inputs[n].requires_grad_(True)
        return inputs
    return make


def _sepconv_kwargs(s: _SepConvShape, inputs: Inputs, relu: bool) -> dict[str, Any]:
    return {
        "stride": s.stride, "padding": "same", "dilation": s.dilation,
        "dw_scale": inputs["dw_scale"], "dw_shift": inputs["dw_shift"], "dw_relu": True,
        "pw_scale": inputs["pw_scale"], "pw_shift": inputs["pw_shift"], "relu": relu,
    }


def _sepconv_case(s: _SepConvShape, batch: int, train: bool, quick: bool) -> Case:
    beg, end = fixed_padding(s.k, s.dilation, "same")
    ho = conv_out_size(s.h, beg, end, s.k, s.dilation, s.stride)
    wo = conv_out_size(s.w, beg, end, s.k, s.dilation, s.stride)
    # Train cases stop before the final ReLU: its gradient is ill-conditioned against the float64 oracle.
    # One output whose exact value is within float32 rounding of 0 (2e-7 of 4 in decoder_1) flips its mask
    # and moves grad_x by ~1e-2 of its max in any float32 implementation that rounds differently from eager.
    relu = not train

    def baseline(inputs: Inputs) -> Tensor:
        # The eager composition (eval mode, BatchNorms folded), imported, never re-typed.
        return _reference.separable_conv2d(inputs["x"], inputs["dw_weight"], inputs["pw_weight"],
                                           **_sepconv_kwargs(s, inputs, relu))

    def run(inputs: Inputs, backend: str) -> Tensor:
        return ops.separable_conv2d(inputs["x"], inputs["dw_weight"], inputs["pw_weight"],
                                    **_sepconv_kwargs(s, inputs, relu), backend=backend)

    def fwd_bytes(inputs: Inputs) -> int:
        x = inputs["x"]
        out = batch * s.o * ho * wo * x.element_size()
        return out + nbytes(*(inputs[n] for n in ("x", "dw_weight", "pw_weight", "dw_scale", "dw_shift",
                                                  "pw_scale", "pw_shift")))

    def fwd_flops(inputs: Inputs) -> float:
        return float(batch * ho * wo * (2 * s.c * s.k * s.k + 2 * s.c * s.o + 4 * s.c + 4 * s.o))

    params: dict[str, Any] = {
        "layer": s.layer, "N": batch, "C": s.c, "O": s.o, "H": s.h, "W": s.w, "k": s.k,
        "stride": s.stride, "dilation": s.dilation, "Ho": ho, "Wo": wo,
        "shape": f"{batch}x{s.c}x{s.h}x{s.w}->{s.o} k{s.k} s{s.stride} d{s.dilation}",
    }
    if not train:
        return Case("separable_conv2d", s.name, "fwd", params, _sepconv_inputs(s, batch, False), baseline, run,
                    fwd_bytes, fwd_flops, quick)

    def train_bytes(inputs: Inputs) -> int:
        # forward's traffic + grad_out in + the grads of x and both weights out
        return fwd_bytes(inputs) + nbytes(inputs["grad_out"], *(inputs[n] for n in _SEPCONV_WRT))

    def train_flops(inputs: Inputs) -> float:
        return 3.0 * fwd_flops(inputs)  # forward + grad of the inputs + grad of the weights

    return Case("separable_conv2d", s.name + "_train", "fwd+bwd",
                {**params, "wrt": list(_SEPCONV_WRT), "final_relu": False},
                _sepconv_inputs(s, batch, True), grad_step(lambda i: baseline(i), _SEPCONV_WRT),
                grad_step(run, _SEPCONV_WRT), train_bytes, train_flops, quick)


@register_op("separable_conv2d")
def separable_conv2d_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """DeepLabv3+ at 513x513: the ASPP separable branches (2048->256, 3x3) at output stride 16 (33x33,
    rates 6/12/18) and 8 (65x65, rates 12/24/36), and Aligned Xception-65 entry/middle/exit flow
    separable convs, and the decoder's two separable convs (256 channels at 129x129); forward and
    forward+backward of each. ``quick`` marks the CI subset."""
    cases = [_sepconv_case(s, batch, False, s.quick) for s in _SEPCONV_SHAPES]
    cases += [_sepconv_case(s, batch, True, s.name in _SEPCONV_TRAIN_QUICK) for s in _SEPCONV_SHAPES]
    return cases

