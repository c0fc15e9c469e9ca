"""``python -m fastseg.bench``: every available backend of every fused op against its eager PyTorch
baseline, measured in the same run.

For each case (a shape taken from a real architecture) and dtype, and each usable backend other than
``reference``:

1. **correctness first**: the backend and the baseline both run on the same inputs and are compared
   with a float64 oracle (the baseline on the inputs cast to float64). A backend passes when
   ``max|backend - oracle| <= 2 * max|baseline - oracle| + atol[dtype] * max|oracle|`` (the tests'
   ratio rule, scaled by the output's magnitude); the max abs / rel error against the baseline are
   reported too. A failure is printed at once and makes the run exit with status 1;
2. **timing**: warm-up, then the median and interquartile range of repeated runs. CPU:
   ``time.perf_counter`` with the number of repetitions fitted to a time budget per measurement
   (``--budget``, 0.5 s by default), baseline and backends alternating in ``--rounds`` rounds so that
   a shared machine's load hits them alike. GPU: ``triton.testing.do_bench`` (L2 flushed before each
   run; 0.2 s per measurement), or CUDA events when Triton is absent. Speed-up = baseline time /
   backend time, both from the same run. On a busy CPU (load average printed and stored) the eager
   baseline, made of many small parallel ops, suffers most: measure on an idle machine;
3. **peak memory**: the peak of bytes allocated on top of what was live before the call. GPU:
   ``torch.cuda.max_memory_allocated`` delta. CPU: ``torch.profiler`` with ``profile_memory=True``,
   the cumulative sum of its allocation events in time order (only allocations through PyTorch's
   allocator are seen: a kernel's ``std::vector`` scratch is not);
4. achieved GB/s (minimum bytes moved: inputs + weights + outputs) and TFLOP/s; on GPU also the
   fraction of the device-to-device copy bandwidth measured at the start of the run (and a dense
   matmul TFLOP/s per dtype, for scale).

Outputs (``--out``, default ``bench/out/``): ``<device>-<ops>.json`` (results + machine and build
info), ``.csv``, ``.png`` (speed-up per case and backend); a table on stdout.
Exit status: 0 all good, 1 a correctness check failed or a backend raised, 2 bad arguments,
3 stopped early (``--time-limit`` or SIGTERM; the partial results are written).

Adding an op: write a function that returns its :class:`Case` list and decorate it with
``@register_op("<op name>")`` (see :func:`separable_conv2d_cases`).

Example::

    python -m fastseg.bench --device cpu --quick
    python -m fastseg.bench --device cuda --dtype fp16,bf16 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastseg import _extension, ops
from fastseg.ops import _reference
from fastseg.ops._reference import conv_out_size, fixed_padding

__all__ = [
    "ATOL",
    "Case",
    "CheckResult",
    "OPS",
    "Timing",
    "check_backend",
    "check_case",
    "get_cases",
    "main",
    "peak_memory_bytes",
    "register_op",
    "separable_conv2d_cases",
    "time_fn",
]

Inputs = dict[str, Any]
Outputs = Tensor | tuple[Tensor, ...]

# Tolerance of a backend, relative to the output's magnitude, on top of the ratio rule (see module doc).
ATOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64,
}
DEFAULT_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cpu": (torch.float32,),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(
        dtype, str(dtype).removeprefix("torch."))


# ---------------------------------------------------------------------------------------------------
# Cases and the op registry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark case of one op.

    Attributes:
        op: the op's name in ``fastseg.ops`` (the key of ``available_backends()``).
        name: unique within the op, e.g. ``"aspp_os16_r6"``.
        mode: ``"fwd"`` or ``"fwd+bwd"`` (forward, then the gradients of the inputs in ``params['wrt']``).
        params: what the case is (shape, stride, ...), for the JSON and the table.
        make_inputs: ``(device, dtype) -> inputs``, fresh seeded random tensors.
        baseline: ``inputs -> outputs``, the eager PyTorch composition from ``fastseg.ops._reference``.
        run: ``(inputs, backend) -> outputs``, the op on that backend; same output structure as baseline.
        bytes_moved: ``inputs -> int``, the minimum bytes a kernel must read and write.
        flops: ``inputs -> float``, floating point operations of one call.
        quick: part of the ``--quick`` subset.
    """

    op: str
    name: str
    mode: str
    params: dict[str, Any]
    make_inputs: Callable[[torch.device, torch.dtype], Inputs]
    baseline: Callable[[Inputs], Outputs]
    run: Callable[[Inputs, str], Outputs]
    bytes_moved: Callable[[Inputs], int] | None = None
    flops: Callable[[Inputs], float] | None = None
    quick: bool = False

    @property
    def label(self) -> str:
        """``name`` plus the mode when it is not a plain forward."""
        return self.name if self.mode == "fwd" else f"{self.name} ({self.mode})"

    @property
    def id(self) -> str:
        """A pytest-friendly id."""
        return self.name if self.mode == "fwd" else f"{self.name}-{self.mode.replace('+', '')}"


OpCases = Callable[..., list[Case]]
OPS: dict[str, OpCases] = {}


def register_op(name: str) -> Callable[[OpCases], OpCases]:
    """Register ``fn(batch: int, quick: bool) -> list[Case]`` as the cases of op ``name``."""
    def deco(fn: OpCases) -> OpCases:
        OPS[name] = fn
        return fn
    return deco


def get_cases(op: str, batch: int = 1, quick: bool = False) -> list[Case]:
    """The cases of ``op`` (only the ``quick`` subset when asked)."""
    if op not in OPS:
        raise ValueError(f"no benchmark cases for op {op!r}; known: {sorted(OPS)}")
    cases = OPS[op](batch=batch, quick=quick)
    return [c for c in cases if c.quick] if quick else cases


def _nbytes(*ts: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _grad_step(forward: Callable[..., Tensor], wrt: Sequence[str]) -> Callable[..., tuple[Tensor, ...]]:
    """Turn ``forward(inputs, *a)`` into forward + backward returning the grads of ``inputs[wrt]``
    against ``inputs['grad_out']`` (``torch.autograd.grad``: nothing accumulates between runs)."""
    def step(inputs: Inputs, *args: Any) -> tuple[Tensor, ...]:
        out = forward(inputs, *args)
        return torch.autograd.grad(out, [inputs[n] for n in wrt], inputs["grad_out"])
    return step


# ---------------------------------------------------------------------------------------------------
# separable_conv2d: DeepLabv3+ (513x513 input) ASPP and Aligned Xception-65 layers
# ---------------------------------------------------------------------------------------------------


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
    _SepConvShape("xception_entry_b1_s2", "Xception-65 entry flow block 1, 3rd sepconv (stride 2, 257->129)",
                  128, 128, 257, 257, stride=2, quick=True),
    _SepConvShape("xception_entry_b2", "Xception-65 entry flow block 2, 1st sepconv", 128, 256, 129, 129),
    _SepConvShape("xception_entry_b2_256", "Xception-65 entry flow block 2, 2nd sepconv", 256, 256, 129, 129),
    _SepConvShape("xception_entry_b3", "Xception-65 entry flow block 3, 1st sepconv", 256, 728, 65, 65),
    _SepConvShape("xception_middle_os16", "Xception-65 middle flow sepconv, OS16", 728, 728, 33, 33, quick=True),
    _SepConvShape("xception_exit_1024_1536_os16", "Xception-65 exit flow block 2, 1st sepconv, OS16 (rate 2)",
                  1024, 1536, 33, 33, dilation=2),
    _SepConvShape("xception_exit_1536_2048_os16", "Xception-65 exit flow block 2, 3rd sepconv, OS16 (rate 2)",
                  1536, 2048, 33, 33, dilation=2),
    _SepConvShape("xception_exit_1024_1536_os32", "Xception-65 exit flow block 2, 1st sepconv, OS32",
                  1024, 1536, 17, 17),
    _SepConvShape("xception_exit_1536_2048_os32", "Xception-65 exit flow block 2, 3rd sepconv, OS32",
                  1536, 2048, 17, 17),
)
# Forward + backward (train-style: grads of x, dw_weight, pw_weight) on these.
_SEPCONV_TRAIN = {"aspp_os16_r12": True, "xception_middle_os16": False, "xception_entry_b2": False}
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


def _sepconv_kwargs(s: _SepConvShape, inputs: Inputs) -> dict[str, Any]:
    return {
        "stride": s.stride, "padding": "same", "dilation": s.dilation,
        "dw_scale": inputs["dw_scale"], "dw_shift": inputs["dw_shift"], "dw_relu": True,
        "pw_scale": inputs["pw_scale"], "pw_shift": inputs["pw_shift"], "relu": True,
    }


def _sepconv_case(s: _SepConvShape, batch: int, train: bool, quick: bool) -> Case:
    beg, end = fixed_padding(s.k, s.dilation, "same")
    ho = conv_out_size(s.h, beg, end, s.k, s.dilation, s.stride)
    wo = conv_out_size(s.w, beg, end, s.k, s.dilation, s.stride)

    def baseline(inputs: Inputs) -> Tensor:
        # The eager composition (eval mode, BatchNorms folded), imported, never re-typed.
        return _reference.separable_conv2d(inputs["x"], inputs["dw_weight"], inputs["pw_weight"],
                                           **_sepconv_kwargs(s, inputs))

    def run(inputs: Inputs, backend: str) -> Tensor:
        return ops.separable_conv2d(inputs["x"], inputs["dw_weight"], inputs["pw_weight"],
                                    **_sepconv_kwargs(s, inputs), backend=backend)

    def fwd_bytes(inputs: Inputs) -> int:
        x = inputs["x"]
        out = batch * s.o * ho * wo * x.element_size()
        return out + _nbytes(*(inputs[n] for n in ("x", "dw_weight", "pw_weight", "dw_scale", "dw_shift",
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
        return fwd_bytes(inputs) + _nbytes(inputs["grad_out"], *(inputs[n] for n in _SEPCONV_WRT))

    def train_flops(inputs: Inputs) -> float:
        return 3.0 * fwd_flops(inputs)  # forward + grad of the inputs + grad of the weights

    return Case("separable_conv2d", s.name + "_train", "fwd+bwd", {**params, "wrt": list(_SEPCONV_WRT)},
                _sepconv_inputs(s, batch, True), _grad_step(lambda i: baseline(i), _SEPCONV_WRT),
                _grad_step(run, _SEPCONV_WRT), train_bytes, train_flops, quick)


@register_op("separable_conv2d")
def separable_conv2d_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """DeepLabv3+ at 513x513: the ASPP separable branches (2048->256, 3x3) at output stride 16 (33x33,
    rates 6/12/18) and 8 (65x65, rates 12/24/36), and Aligned Xception-65 entry/middle/exit flow
    separable convs; forward, plus forward+backward on a few of them. ``quick`` marks the CI subset."""
    cases = [_sepconv_case(s, batch, False, s.quick) for s in _SEPCONV_SHAPES]
    by_name = {s.name: s for s in _SEPCONV_SHAPES}
    cases += [_sepconv_case(by_name[n], batch, True, q) for n, q in _SEPCONV_TRAIN.items()]
    return cases


# ---------------------------------------------------------------------------------------------------
# position_attention / channel_attention: DANet head, ResNet-101 at output stride 8 (C = 512, Ck = 64)
# ---------------------------------------------------------------------------------------------------

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
        return _nbytes(*(inputs[k] for k in names)) + batch * c * n * next(iter(inputs.values())).element_size()

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
                _grad_step(lambda i: baseline(i), names), _grad_step(run, names),
                lambda i: 2 * fwd_bytes(i), lambda i: 3.5 * fwd_flops(i), quick)


def _danet_cases(op: str, batch: int) -> list[Case]:
    cases = [_attention_case(op, name, side, batch, False, name == "danet_512") for name, side in _DANET_SIZES]
    return cases + [_attention_case(op, name, side, batch, True, False)
                    for name, side in _DANET_SIZES if name in _DANET_TRAIN]


@register_op("position_attention")
def position_attention_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """DANet PAM at 1/8 of 512², 768², 1024² inputs (N = 64², 96², 128²; C = 512, Ck = 64): forward,
    and forward+backward at 512² and 768², against the eager formulation; the 768² ones also against
    ``F.scaled_dot_product_attention`` (scale=1) on the same tensors."""
    op, sdpa = "position_attention", "position_attention_sdpa"
    return _danet_cases(op, batch) + [
        _attention_case(op, "danet_768_vs_sdpa", 768, batch, train, False, eager=sdpa) for train in (False, True)]


@register_op("channel_attention")
def channel_attention_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """DANet CAM on the same feature maps (C = 512)."""
    return _danet_cases("channel_attention", batch)


# ---------------------------------------------------------------------------------------------------
# roi_align / roi_upsample: AUNet mask-branch loads on an 800x1216 image (256 channels)
# ---------------------------------------------------------------------------------------------------

_ROI_IMAGE = (800, 1216)
_ROI_CHANNELS = 256


@dataclass(frozen=True)
class _RoiLoad:
    rois: int
    m: int  # side of each RoI's map
    stride: int  # the feature map is 1/stride of the image
    quick: bool = False

    @property
    def name(self) -> str:
        return f"aunet_r{self.rois}_m{self.m}_1/{self.stride}"

    @property
    def hw(self) -> tuple[int, int]:
        return _ROI_IMAGE[0] // self.stride, _ROI_IMAGE[1] // self.stride


_ROI_LOADS = tuple(_RoiLoad(k, m, s, quick=(k, m, s) == (100, 14, 8))
                   for s in (4, 8) for k in (100, 512) for m in (28, 14))
# Detectron2 / mmdet mask heads: aligned RoIs, adaptive sampling grid.
_ROI_KW: dict[str, Any] = {"sampling_ratio": -1, "aligned": True}


def _roi_inputs(load: _RoiLoad, batch: int, maps: bool) -> Callable[[torch.device, torch.dtype], Inputs]:
    """Proposal-like boxes (sides log-uniform in 32..512 px, centres uniform, clipped to the image) spread
    over ``batch`` images, plus the features [batch, 256, H, W] or the RoI maps [K, 256, m, m]."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(load.rois * 7 + load.m * 3 + load.stride)
        k = load.rois * batch
        img_h, img_w = _ROI_IMAGE
        side = torch.exp(torch.empty(k, 2).uniform_(math.log(32), math.log(512), generator=g))
        centre = torch.rand(k, 2, generator=g) * torch.tensor([img_w, img_h])
        lo = (centre - side / 2).clamp(min=0)
        hi = torch.minimum(centre + side / 2, torch.tensor([img_w - 1.0, img_h - 1.0]))
        idx = torch.arange(k).remainder(batch).unsqueeze(1).float()
        inputs: Inputs = {"rois": torch.cat([idx, lo, hi], 1).to(device=device, dtype=dtype)}
        if maps:
            inputs["maps"] = torch.randn(k, _ROI_CHANNELS, load.m, load.m, generator=g).to(device=device, dtype=dtype)
        else:
            inputs["features"] = torch.randn(batch, _ROI_CHANNELS, *load.hw, generator=g).to(device=device,
                                                                                             dtype=dtype)
        return inputs
    return make


def _roi_params(load: _RoiLoad, batch: int, baseline: str) -> dict[str, Any]:
    h, w = load.hw
    return {"layer": f"AUNet mask branch, {_ROI_IMAGE[0]}x{_ROI_IMAGE[1]} image", "N": batch, "C": _ROI_CHANNELS,
            "H": h, "W": w, "K": load.rois * batch, "m": load.m, "spatial_scale": 1 / load.stride,
            "shape": f"{load.rois * batch}x{_ROI_CHANNELS}x{load.m}x{load.m} <-> {batch}x{_ROI_CHANNELS}x{h}x{w}",
            "baseline": baseline, **_ROI_KW}


def _roi_bytes(load: _RoiLoad, batch: int) -> Callable[[Inputs], int]:
    def nbytes(inputs: Inputs) -> int:  # the map read once + the RoI maps written once (or the reverse)
        h, w = load.hw
        return (batch * h * w + load.rois * batch * load.m * load.m) * _ROI_CHANNELS * inputs["rois"].element_size()
    return nbytes


@register_op("roi_align")
def roi_align_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """RoIAlign of 100 / 512 proposals per image into 28² / 14² maps from 1/4 and 1/8 feature maps of an
    800x1216 image, against ``torchvision.ops.roi_align`` (forward)."""
    cases = []
    for load in _ROI_LOADS:
        scale = 1 / load.stride

        def baseline(i: Inputs, load: _RoiLoad = load, scale: float = scale) -> Tensor:
            return _reference.roi_align_torchvision(i["features"], i["rois"], load.m, spatial_scale=scale, **_ROI_KW)

        def run(i: Inputs, backend: str, load: _RoiLoad = load, scale: float = scale) -> Tensor:
            return ops.roi_align(i["features"], i["rois"], load.m, spatial_scale=scale, **_ROI_KW, backend=backend)

        cases.append(Case("roi_align", load.name, "fwd", _roi_params(load, batch, "torchvision.ops.roi_align"),
                          _roi_inputs(load, batch, False), baseline, run, _roi_bytes(load, batch), None, load.quick))
    return cases


@register_op("roi_upsample")
def roi_upsample_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """RoIUpsample of the same loads. ``adjoint`` against torchvision's roi_align backward kernel (the same
    function); ``aunet`` against the reference (on the 100-RoI loads: the dense reference is slow). On a
    GPU, ``adjoint`` also runs with ``torch.use_deterministic_algorithms(True)`` (the gather kernel)."""
    modes = ["adjoint", "aunet"] + (["adjoint_deterministic"] if torch.cuda.is_available() else [])
    cases = []
    for load in _ROI_LOADS:
        scale = 1 / load.stride
        shape = (batch, _ROI_CHANNELS, *load.hw)
        for mode in modes:
            if mode == "aunet" and load.rois > 100:
                continue
            op_mode = mode.removesuffix("_deterministic")

            def baseline(i: Inputs, shape: tuple[int, ...] = shape, scale: float = scale,
                         mode: str = op_mode) -> Tensor:
                if mode == "adjoint":
                    return _reference.roi_align_backward_torchvision(i["maps"], i["rois"], shape, spatial_scale=scale,
                                                                     **_ROI_KW)
                return _reference.roi_upsample(i["maps"], i["rois"], shape[2:], batch_size=shape[0],
                                               spatial_scale=scale, mode=mode, **_ROI_KW)

            def run(i: Inputs, backend: str, shape: tuple[int, ...] = shape, scale: float = scale,
                    mode: str = mode) -> Tensor:
                with _deterministic(mode.endswith("_deterministic")):
                    return ops.roi_upsample(i["maps"], i["rois"], shape[2:], batch_size=shape[0], spatial_scale=scale,
                                            mode=mode.removesuffix("_deterministic"), **_ROI_KW, backend=backend)

            base_name = "torchvision roi_align backward" if op_mode == "adjoint" else "_reference.roi_upsample"
            cases.append(Case("roi_upsample", f"{load.name}_{mode}", "fwd", _roi_params(load, batch, base_name),
                              _roi_inputs(load, batch, True), baseline, run, _roi_bytes(load, batch), None,
                              load.quick and mode != "aunet"))
    return cases


@contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms(on) for the duration (restored after)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# ---------------------------------------------------------------------------------------------------
# matrix_nms: SOLOv2 test-time masks at 1/4 of an 800x1216 image; PP-YOLO boxes
# ---------------------------------------------------------------------------------------------------

_NMS_HW = (200, 304)
_NMS_CLASSES = 80
_NMS_KW: dict[str, Any] = {"kernel": "gaussian", "sigma": 2.0, "filter_thr": 0.05, "max_num": 100}


def _nms_inputs(n: int, batch: int) -> Callable[[torch.device, torch.dtype], Inputs]:
    """SOLOv2-like predictions: ~n/10 objects (ellipses of 10..120 px radius, one class each); every mask
    is its object's ellipse shifted by a few pixels and rescaled (the grid cells around an object all
    predict it), 10% of them with another label. Several images go in as lists (``batch`` > 1)."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(n * 13 + batch)
        h, w = _NMS_HW
        yy, xx = torch.arange(h).view(1, h, 1).float(), torch.arange(w).view(1, 1, w).float()
        images: dict[str, list[Tensor]] = {"masks": [], "labels": [], "scores": []}
        for _ in range(batch):
            objects = max(n // 10, 1)
            centre = torch.rand(objects, 2, generator=g) * torch.tensor([w, h])
            radius = torch.rand(objects, 2, generator=g) * 110 + 10
            cls = torch.randint(0, _NMS_CLASSES, (objects,), generator=g)
            obj = torch.randint(0, objects, (n,), generator=g)
            c = centre[obj] + torch.randn(n, 2, generator=g) * 4
            r = radius[obj] * (1 + 0.15 * torch.randn(n, 1, generator=g))
            inside = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + \
                ((yy - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2
            flip = torch.rand(n, generator=g) < 0.1
            labels = torch.where(flip, torch.randint(0, _NMS_CLASSES, (n,), generator=g), cls[obj])
            images["masks"].append((inside <= 1).to(device))
            images["labels"].append(labels.to(device))
            images["scores"].append(torch.rand(n, generator=g).to(device=device, dtype=dtype))
        if batch == 1:
            return {k: v[0] for k, v in images.items()}
        return images  # type: ignore[return-value]
    return make


def _nms_bytes(inputs: Inputs) -> int:
    masks = inputs["masks"]
    return sum(m.numel() for m in masks) if isinstance(masks, list) else masks.numel()


@register_op("matrix_nms")
def matrix_nms_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """SOLOv2 Matrix NMS of 100 / 500 / 2000 masks of 200x304 (1/4 of 800x1216), 80 classes, gaussian
    kernel, filter 0.05, top 100, against the float-matmul formulation (mmdet's); plus a batch of 8
    images of 500 masks through ``matrix_nms_batched`` (one backend call) against per-image calls."""
    cases = []
    for n in (100, 500, 2000):
        def baseline(i: Inputs) -> tuple[Tensor, ...]:
            return _reference.matrix_nms(i["masks"], i["labels"], i["scores"], **_NMS_KW)

        def run(i: Inputs, backend: str) -> tuple[Tensor, ...]:
            return ops.matrix_nms(i["masks"], i["labels"], i["scores"], **_NMS_KW, backend=backend)

        params = {"layer": "SOLOv2 test-time NMS, 800x1216 image", "n": n, "H": _NMS_HW[0], "W": _NMS_HW[1],
                  "classes": _NMS_CLASSES, "shape": f"{n}x{_NMS_HW[0]}x{_NMS_HW[1]}", **_NMS_KW}
        cases.append(Case("matrix_nms", f"solov2_{n}", "fwd", params, _nms_inputs(n, 1), baseline, run, _nms_bytes,
                          None, quick=n == 100))

    def batch_baseline(i: Inputs) -> tuple[Tensor, ...]:
        outs = [_reference.matrix_nms(m, lab, s, **_NMS_KW) for m, lab, s in zip(i["masks"], i["labels"], i["scores"],
                                                                                   strict=True)]
        return tuple(torch.cat([o[k] for o in outs]) for k in range(4))

    def batch_run(i: Inputs, backend: str) -> tuple[Tensor, ...]:
        outs = ops.matrix_nms_batched(i["masks"], i["labels"], i["scores"], **_NMS_KW, backend=backend)
        return tuple(torch.cat([o[k] for o in outs]) for k in range(4))

    params = {"layer": "SOLOv2 test-time NMS, batch of 8", "n": 500, "N": 8, "H": _NMS_HW[0], "W": _NMS_HW[1],
              "classes": _NMS_CLASSES, "shape": f"8x500x{_NMS_HW[0]}x{_NMS_HW[1]}", **_NMS_KW}
    cases.append(Case("matrix_nms", "solov2_500_batch8", "fwd", params, _nms_inputs(500, 8), batch_baseline,
                      batch_run, _nms_bytes, None))
    return cases


def _box_inputs(n: int) -> Callable[[torch.device, torch.dtype], Inputs]:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(n)
        centre = torch.rand(n, 2, generator=g) * torch.tensor([1216.0, 800.0])
        size = torch.exp(torch.empty(n, 2).uniform_(math.log(16), math.log(600), generator=g))
        boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
        return {"boxes": boxes.to(device=device, dtype=dtype),
                "labels": torch.randint(0, _NMS_CLASSES, (n,), generator=g).to(device),
                "scores": torch.rand(n, generator=g).to(device=device, dtype=dtype)}
    return make


@register_op("matrix_nms_boxes")
def matrix_nms_boxes_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """PP-YOLO's box Matrix NMS (nms_top_k 1000, keep_top_k 100, 80 classes) against Paddle-style
    per-class loops in PyTorch."""
    kw = {**_NMS_KW, "nms_pre": 1000}

    def baseline(i: Inputs) -> tuple[Tensor, ...]:
        return _reference.matrix_nms_boxes(i["boxes"], i["labels"], i["scores"], **kw)

    def run(i: Inputs, backend: str) -> tuple[Tensor, ...]:
        return ops.matrix_nms_boxes(i["boxes"], i["labels"], i["scores"], **kw, backend=backend)

    return [Case("matrix_nms_boxes", f"ppyolo_{n}" + ("_top1000" if n > 1000 else ""), "fwd",
                 {"layer": "PP-YOLO box NMS", "n": n, "classes": _NMS_CLASSES, "shape": f"{n}x4", **kw},
                 _box_inputs(n), baseline, run, None, None, quick=n == 1000) for n in (1000, 4000)]


# ---------------------------------------------------------------------------------------------------
# dense_crf: DeepLab's CRF post-processing of a 21-class (PASCAL VOC) output
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------------


def _as_tuple(out: Outputs) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _cast(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """Floating tensors of ``inputs`` cast to ``dtype`` (same values; requires_grad kept)."""
    out: Inputs = {}
    for k, v in inputs.items():
        if isinstance(v, Tensor) and v.is_floating_point():
            out[k] = v.detach().to(dtype).requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


@dataclass
class CheckResult:
    """A backend's outputs against the baseline and the float64 oracle (worst output reported).

    ``max_abs_err``/``max_rel_err``: against the same-dtype baseline (rel = abs / max|baseline|);
    ``err_vs_fp64``/``baseline_err_vs_fp64``: of the backend and of the baseline against the oracle,
    relative to max|oracle|; ``limit``: what ``err_vs_fp64`` must not exceed.
    """

    ok: bool
    max_abs_err: float
    max_rel_err: float
    err_vs_fp64: float
    baseline_err_vs_fp64: float
    limit: float
    worst_output: str
    message: str = ""


def _output_names(case: Case, n: int) -> list[str]:
    wrt = case.params.get("wrt")
    if wrt and len(wrt) == n:
        return [f"grad_{w}" for w in wrt]
    return ["out"] if n == 1 else [f"out{i}" for i in range(n)]


def check_backend(case: Case, out: Outputs, base: Outputs, oracle: Outputs, dtype: torch.dtype) -> CheckResult:
    """Compare ``out`` (backend) with ``base`` (baseline, same dtype) and ``oracle`` (baseline in fp64)."""
    outs, bases, refs = _as_tuple(out), _as_tuple(base), _as_tuple(oracle)
    names = _output_names(case, len(refs))
    if len(outs) != len(refs):
        return CheckResult(False, math.inf, math.inf, math.inf, 0.0, 0.0, "-",
                           f"{len(outs)} outputs, expected {len(refs)}")
    atol = ATOL.get(dtype, 1e-2)
    worst: CheckResult | None = None
    for name, o, b, r in zip(names, outs, bases, refs, strict=True):
        if o.shape != r.shape:
            return CheckResult(False, math.inf, math.inf, math.inf, 0.0, 0.0, name,
                               f"{name}: shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        if r.numel() == 0:
            continue
        o64, b64, r64 = o.detach().double(), b.detach().double(), r.detach().double()
        if not torch.isfinite(o64).all():
            return CheckResult(False, math.inf, math.inf, math.inf, 0.0, 0.0, name, f"{name}: non-finite values")
        scale = max(r64.abs().max().item(), 1e-30)
        abs_err = (o64 - b64).abs().max().item()
        err = (o64 - r64).abs().max().item() / scale
        base_err = (b64 - r64).abs().max().item() / scale
        limit = 2.0 * base_err + atol
        res = CheckResult(err <= limit, abs_err, abs_err / max(b64.abs().max().item(), 1e-30), err, base_err,
                          limit, name)
        if not res.ok:
            res.message = (f"{name}: error vs fp64 {err:.3g} (relative to max|ref| {scale:.3g}) > "
                           f"2 x baseline's {base_err:.3g} + {atol:g}")
        if worst is None or err / limit > worst.err_vs_fp64 / worst.limit:
            worst = res
    return worst or CheckResult(True, 0.0, 0.0, 0.0, 0.0, atol, "-", "empty output")


def check_case(case: Case, inputs: Inputs, backend: str, dtype: torch.dtype) -> CheckResult:
    """Run the baseline, its float64 oracle and ``backend`` on ``inputs`` and compare them."""
    with torch.no_grad() if case.mode == "fwd" else torch.enable_grad():
        base = case.baseline(inputs)
        oracle = case.baseline(_cast(inputs, torch.float64))
        out = case.run(inputs, backend)
    return check_backend(case, out, base, oracle, dtype)


# ---------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call times in milliseconds: median, quartiles, and the number of timed samples."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    reps: int
    method: str
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range."""
        return self.q3_ms - self.q1_ms


def _quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], statistics.median(samples), q[2]


def _time_cpu(fn: Callable[[], Any], budget_s: float, min_reps: int) -> Timing:
    fn()
    # Warm-up: at least two more calls and ~10% of the budget.
    n, t1 = 0, time.perf_counter()
    while n < 2 or (time.perf_counter() - t1 < 0.1 * budget_s and n < 100):
        fn()
        n += 1
    est = max((time.perf_counter() - t1) / n, 1e-7)
    inner = max(1, math.ceil(1e-3 / est))  # calls per sample: a sample lasts at least ~1 ms
    reps = int(min(max(budget_s / (est * inner), min_reps), 10_000))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t) / inner * 1e3)
    q1, med, q3 = _quartiles(samples)
    return Timing(med, q1, q3, reps, "perf_counter" + (f" ({inner} calls/sample)" if inner > 1 else ""), samples)


def _time_cuda_events(fn: Callable[[], Any], budget_s: float, min_reps: int) -> Timing:
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(0.25 * budget_s * 1e3 / est))):
        fn()
    reps = int(min(max(budget_s * 1e3 / est, min_reps), 10_000))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        cache.zero_()  # flush L2
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    q1, med, q3 = _quartiles(samples)
    return Timing(med, q1, q3, reps, "cuda events", samples)


def _time_cuda(fn: Callable[[], Any], budget_s: float, min_reps: int) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, budget_s, min_reps)
    warmup, rep = max(1, int(budget_s * 250)), max(1, int(budget_s * 1000))
    try:
        samples = [float(v) for v in do_bench(fn, warmup=warmup, rep=rep, return_mode="all")]
        q1, med, q3 = _quartiles(samples)
        return Timing(med, q1, q3, len(samples), "triton do_bench", samples)
    except (AssertionError, TypeError, ValueError):  # an older Triton without return_mode="all"
        q1, med, q3 = (float(v) for v in do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.25, 0.5, 0.75]))
        return Timing(med, q1, q3, -1, "triton do_bench (quantiles)")


def time_fn(fn: Callable[[], Any], device: torch.device, budget_s: float = 0.5, min_reps: int = 5) -> Timing:
    """Median/IQR of ``fn()`` after warm-up, spending about ``budget_s`` seconds on the timed runs."""
    if device.type == "cuda":
        return _time_cuda(fn, budget_s, min_reps)
    return _time_cpu(fn, budget_s, min_reps)


def _pool(parts: Sequence[Timing]) -> Timing:
    """One Timing from the samples of several (interleaved) measurements of the same function."""
    samples = [v for t in parts for v in t.samples_ms]
    if len(parts) == 1 or not samples:
        return parts[0]
    q1, med, q3 = _quartiles(samples)
    return Timing(med, q1, q3, len(samples), f"{parts[0].method}, {len(parts)} interleaved rounds", samples)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fd 2 (Kineto prints start/stop lines from C++); Python errors still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns() if hasattr(e, "start_ns") else e.start_us())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` on top of what was allocated before (outputs included)."""
    return _cuda_peak_bytes(fn) if device.type == "cuda" else _cpu_peak_bytes(fn)


def _memory_probe(device: torch.device) -> dict[str, Any]:
    """Sanity check of the memory measurement: a plain matmul's peak must equal its output's size."""
    a = torch.randn(512, 256, device=device)
    b = torch.randn(256, 384, device=device)
    expected = 512 * 384 * 4
    try:
        _ = a @ b  # warm-up: cuBLAS allocates its workspace once, on first use
        del _
        got = peak_memory_bytes(lambda: a @ b, device)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": got == expected, "matmul_peak_bytes": got, "matmul_output_bytes": expected}


def _time_copy(nbytes: int, device: torch.device, budget_s: float) -> Timing:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device, budget_s)


def _ceilings(device: torch.device, dtypes: Sequence[torch.dtype], budget_s: float) -> dict[str, Any]:
    """GPU roofs measured once per run: device-to-device copy GB/s, and dense matmul TFLOP/s per dtype."""
    if device.type != "cuda":
        return {}
    out: dict[str, Any] = {}
    try:
        nbytes = 2 * 2**30
        t = _time_copy(nbytes, device, budget_s)
        out["copy_GBps"] = 2 * nbytes / (t.median_ms * 1e-3) / 1e9  # read + write
    except Exception as e:
        out["copy_error"] = f"{type(e).__name__}: {e}"
    out["matmul_TFLOPs"] = {}
    for dt in dtypes:
        try:
            n = 8192
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            t = time_fn(lambda a=a, b=b: a @ b, device, budget_s)
            out["matmul_TFLOPs"][_dtype_name(dt)] = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
            del a, b
        except Exception as e:
            out["matmul_TFLOPs"][_dtype_name(dt)] = f"{type(e).__name__}: {e}"
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------------
# Machine info
# ---------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Versions, hardware, threads, and what fastseg._C was built for."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "build_info": _extension.build_info(),
        "extension_loaded": _extension.has_ops(),
        "extension_error": _extension.load_error(),
        "backend_status": ops.backend_status(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "loadavg_at_start": _loadavg(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({
            "device_name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "device_memory_GiB": round(p.total_memory / 2**30, 1),
            "sm_count": p.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        })
    else:
        info["device_name"] = info["cpu"]
    return info


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


class _Stop(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, write what we have."""


@dataclass
class _Row:
    op: str
    case: str
    mode: str
    dtype: str
    backend: str
    status: str  # ok | FAIL | ERROR | skipped
    params: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    check: dict[str, Any] = field(default_factory=dict)
    ref_ms: float | None = None
    ref_iqr_ms: float | None = None
    ref_reps: int | None = None
    ms: float | None = None
    iqr_ms: float | None = None
    reps: int | None = None
    speedup: float | None = None
    ref_peak_MB: float | None = None
    peak_MB: float | None = None
    bytes_moved: int | None = None
    flops: float | None = None
    ref_GBps: float | None = None
    GBps: float | None = None
    pct_copy_bw: float | None = None
    ref_TFLOPs: float | None = None
    TFLOPs: float | None = None
    timing_method: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _usable_backends(op: str, device: torch.device, wanted: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    avail = ops.available_backends(device).get(op, [])
    status = ops.backend_status(device).get(op, {})
    skipped = {b: why for b, why in status.items() if why != "ok" and b != "reference"}
    out = []
    for b in avail:
        if b == "reference":
            continue
        if b == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            skipped[b] = "TRITON_INTERPRET=1: the interpreter is a correctness tool, never benchmarked"
            continue
        if wanted and b not in wanted:
            skipped[b] = "not selected (--backends)"
            continue
        out.append(b)
    return out, skipped


def _bench_case(case: Case, dtype: torch.dtype, device: torch.device, backends: Sequence[str],
                args: argparse.Namespace, log: Callable[[str], None]) -> list[_Row]:
    dname = _dtype_name(dtype)
    base_row = {"op": case.op, "case": case.label, "mode": case.mode, "dtype": dname, "params": case.params}
    rows: list[_Row] = []
    try:
        inputs = case.make_inputs(device, dtype)
        with torch.no_grad() if case.mode == "fwd" else torch.enable_grad():
            base = case.baseline(inputs)
            oracle = case.baseline(_cast(inputs, torch.float64)) if not args.no_check else None
        _sync(device)
    except Exception as e:
        msg = f"baseline failed: {type(e).__name__}: {e}"
        log(f"ERROR {case.label} {dname}: {msg}")
        return [_Row(**base_row, backend=b, status="ERROR", message=msg) for b in (backends or ["-"])]
    grad_ctx = torch.no_grad if case.mode == "fwd" else torch.enable_grad
    nbytes = case.bytes_moved(inputs) if case.bytes_moved else None
    flops = case.flops(inputs) if case.flops else None

    def baseline_call() -> Outputs:
        with grad_ctx():
            return case.baseline(inputs)

    # Correctness first, for every backend.
    checked: list[tuple[str, Callable[[], Outputs]]] = []
    for b in backends:
        def call(b: str = b) -> Outputs:
            with grad_ctx():
                return case.run(inputs, b)
        row = _Row(**base_row, backend=b, status="ok", bytes_moved=nbytes, flops=flops)
        rows.append(row)
        try:
            out = call()
            _sync(device)
        except Exception as e:
            row.status, row.message = "ERROR", f"{type(e).__name__}: {e}"
            log(f"ERROR {case.label} {dname} {b}: {row.message}")
            continue
        if oracle is not None:
            res = check_backend(case, out, base, oracle, dtype)
            row.check = dataclasses.asdict(res)
            if not res.ok:
                row.status, row.message = "FAIL", res.message
                log(f"CORRECTNESS FAILURE {case.label} {dname} {b}: {res.message}")
                continue
        del out
        checked.append((b, call))
    del base, oracle

    if not backends:  # nothing to compare: still time the baseline
        rows.append(_Row(**base_row, backend="-", status="skipped", message="no non-reference backend usable",
                         bytes_moved=nbytes, flops=flops))
    if not checked and backends:
        return rows
    # Timing: baseline and backends alternate for `rounds` rounds (CPU; a shared machine's load then
    # hits all of them alike), each round spending budget / rounds per function.
    by_name = {r.backend: r for r in rows}
    rounds = max(1, args.rounds) if device.type == "cpu" else 1
    budget, min_reps = args.budget / rounds, max(1, math.ceil(args.min_reps / rounds))
    ref_parts: list[Timing] = []
    parts: dict[str, list[Timing]] = {b: [] for b, _ in checked}
    try:
        for _ in range(rounds):
            ref_parts.append(time_fn(baseline_call, device, budget, min_reps))
            for b, call in list(checked):
                try:
                    parts[b].append(time_fn(call, device, budget, min_reps))
                except Exception as e:
                    r = by_name[b]
                    r.status, r.message = "ERROR", f"timing failed: {type(e).__name__}: {e}"
                    log(f"ERROR {case.label} {dname} {b}: {r.message}")
                    checked.remove((b, call))
        ref_t = _pool(ref_parts)
        ref_peak = peak_memory_bytes(baseline_call, device) / 2**20
    except Exception as e:
        for r in rows:
            if r.status == "ok":
                r.status, r.message = "ERROR", f"baseline timing failed: {type(e).__name__}: {e}"
        return rows
    for r in rows:
        r.ref_ms, r.ref_iqr_ms, r.ref_peak_MB = ref_t.median_ms, ref_t.iqr_ms, ref_peak
        r.ref_reps = ref_t.reps
        if nbytes:
            r.ref_GBps = nbytes / (ref_t.median_ms * 1e-3) / 1e9
        if flops:
            r.ref_TFLOPs = flops / (ref_t.median_ms * 1e-3) / 1e12
    for b, call in checked:
        r = by_name[b]
        t = _pool(parts[b])
        try:
            r.peak_MB = peak_memory_bytes(call, device) / 2**20
        except Exception as e:
            r.status, r.message = "ERROR", f"peak memory failed: {type(e).__name__}: {e}"
            log(f"ERROR {case.label} {dname} {b}: {r.message}")
            continue
        r.ms, r.iqr_ms, r.reps, r.timing_method = t.median_ms, t.iqr_ms, t.reps, t.method
        r.speedup = ref_t.median_ms / t.median_ms
        if nbytes:
            r.GBps = nbytes / (t.median_ms * 1e-3) / 1e9
        if flops:
            r.TFLOPs = flops / (t.median_ms * 1e-3) / 1e12
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(rows: Sequence[_Row], device: torch.device) -> str:
    head = ["op", "case", "dtype", "backend", "ref ms", "ms", "speed-up", "ref peak MB", "peak MB", "rel err", "status"]
    if device.type == "cuda":
        head[9:9] = ["ref GB/s", "GB/s", "%copy", "TFLOP/s"]
    lines = []
    for r in rows:
        speed = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        err = r.check.get("err_vs_fp64")
        cells = [r.op, r.case, r.dtype, r.backend,
                 _fmt(r.ref_ms, ".3f") + ("" if r.ref_iqr_ms is None else f" ±{r.ref_iqr_ms / 2:.3f}"),
                 _fmt(r.ms, ".3f") + ("" if r.iqr_ms is None else f" ±{r.iqr_ms / 2:.3f}"),
                 speed, _fmt(r.ref_peak_MB, ".2f"), _fmt(r.peak_MB, ".2f"),
                 "-" if err is None else f"{err:.1e}", r.status + (f": {r.message[:60]}" if r.message else "")]
        if device.type == "cuda":
            cells[9:9] = [_fmt(r.ref_GBps, ".0f"), _fmt(r.GBps, ".0f"), _fmt(r.pct_copy_bw, ".0f"),
                          _fmt(r.TFLOPs, ".1f")]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt_line = "  ".join(f"{{:{'<' if i < 4 or i == len(head) - 1 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt_line.format(*head), "  ".join("-" * w for w in widths)]
    out += [fmt_line.format(*c) for c in lines]
    others = sorted({f"; {r.op}: {_baseline_name(r)}" for r in rows if not _baseline_name(r).startswith("_ref")})
    out.append("ms: median ± IQR/2 of one call; speed-up = ref ms / ms (ref = eager PyTorch from "
               f"fastseg.ops._reference, same run; the CSV's baseline column names the others{''.join(others)});"
               "\npeak MB: bytes allocated on top of the live "
               "ones during one call, outputs included; rel err: max|out - fp64 oracle| / max|oracle| (worst output)")
    return "\n".join(out)


_CSV_FIELDS = ["op", "case", "mode", "dtype", "backend", "status", "shape", "baseline", "ref_ms", "ref_iqr_ms",
               "ref_reps", "ms", "iqr_ms", "reps", "speedup", "ref_peak_MB", "peak_MB", "bytes_moved", "flops",
               "ref_GBps", "GBps", "pct_copy_bw", "ref_TFLOPs", "TFLOPs", "max_abs_err", "max_rel_err", "err_vs_fp64",
               "baseline_err_vs_fp64", "limit", "message"]


def _baseline_name(r: _Row) -> str:
    """What the case's ``ref`` is: named in its params when not fastseg.ops._reference's eager op."""
    return str(r.params.get("baseline", f"_reference.{r.op}"))


def _write_csv(path: Path, rows: Sequence[_Row]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            d = dataclasses.asdict(r)
            d.update({k: v for k, v in r.check.items() if k in _CSV_FIELDS})
            d["shape"] = r.params.get("shape", "")
            d["baseline"] = _baseline_name(r)
            w.writerow(d)


def _plot(path: Path, rows: Sequence[_Row], title: str) -> str | None:
    """Speed-up (and peak-memory ratio) per case and backend; returns why not when it cannot plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib unavailable ({e})"
    groups: list[str] = []
    backends: list[str] = []
    several_ops = len({r.op for r in rows}) > 1

    def group(r: _Row) -> str:
        return (f"{r.op}: " if several_ops else "") + f"{r.case} [{r.dtype}]"

    for r in rows:
        g = group(r)
        if g not in groups:
            groups.append(g)
        if r.backend != "-" and r.backend not in backends:
            backends.append(r.backend)
    if not groups or not backends:
        return "nothing to plot"
    data = {(group(r), r.backend): r for r in rows}
    width = 0.8 / len(backends)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.55 * len(groups) * max(1, len(backends)) + 2), 9),
                             sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    xs = range(len(groups))
    for j, b in enumerate(backends):
        pos = [x - 0.4 + width * (j + 0.5) for x in xs]
        sp = [data[(g, b)].speedup if (g, b) in data and data[(g, b)].speedup else 0.0 for g in groups]
        mem = [data[(g, b)].peak_MB / data[(g, b)].ref_peak_MB
               if (g, b) in data and data[(g, b)].peak_MB is not None and data[(g, b)].ref_peak_MB else 0.0
               for g in groups]
        bars = axes[0].bar(pos, sp, width, label=b)
        for rect, v in zip(bars, sp, strict=True):
            if v:
                axes[0].annotate(f"{v:.2f}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom",
                                 fontsize=7)
        for g_i, g in enumerate(groups):
            r = data.get((g, b))
            if r is not None and r.status in ("FAIL", "ERROR"):
                axes[0].annotate(r.status, (pos[g_i], 0.05), ha="center", va="bottom", color="red", fontsize=7,
                                 rotation=90)
        axes[1].bar(pos, mem, width, label=b)
    axes[0].axhline(1.0, color="black", linewidth=1, linestyle="--")
    axes[0].set_ylabel("speed-up vs eager PyTorch (x)")
    axes[0].set_title(title, fontsize=10)
    axes[0].legend()
    axes[1].axhline(1.0, color="black", linewidth=1, linestyle="--")
    axes[1].set_ylabel("peak memory / eager's")
    axes[1].set_xticks(list(xs))
    axes[1].set_xticklabels(groups, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastseg.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops (default: all: {','.join(OPS)})")
    p.add_argument("--cases", default=None, help="only cases whose name contains one of these comma-separated words")
    p.add_argument("--backends", default=None, help="comma-separated backends (default: every usable one)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes: fp32,fp16,bf16 (default: fp32 on CPU; fp16,bf16,fp32 on CUDA)")
    p.add_argument("--batch", type=int, default=1, help="batch size of every case (default 1)")
    p.add_argument("--quick", action="store_true", help="the small CI subset, short measurements")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed runs per measurement (default 0.5 on CPU, 0.2 on CUDA; 0.1 with --quick)")
    p.add_argument("--min-reps", type=int, default=5, help="at least this many timed samples (default 5)")
    p.add_argument("--rounds", type=int, default=None,
                   help="CPU: baseline and backends timed alternately in this many rounds (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks (not recommended)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole run, shared equally by the ops (time an op leaves unused goes to the "
                        "next); an op's remaining cases are skipped once its share is spent (exit 3; partial results "
                        "written)")
    p.add_argument("--out", default="bench/out", help="output folder (default bench/out/)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget must be > 0, got {args.budget}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.budget is None:
        args.budget = 0.1 if args.quick else 0.2 if args.device == "cuda" else 0.5
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.quick:
        args.min_reps = min(args.min_reps, 3)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; see the module docstring. Returns the exit status."""
    args = _parse_args(argv)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    dev_name = args.device
    if dev_name == "cuda" and not torch.cuda.is_available():
        log("fastseg.bench: --device cuda but no CUDA GPU is visible")
        return EXIT_USAGE
    device = torch.device(dev_name)
    try:
        dtypes = (tuple(DTYPES[d.strip().lower()] for d in args.dtype.split(",") if d.strip()) if args.dtype
                  else DEFAULT_DTYPES[device.type])
    except KeyError as e:
        log(f"fastseg.bench: unknown dtype {e}; expected one of {sorted(DTYPES)}")
        return EXIT_USAGE
    op_names = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in op_names if o not in OPS]
    if unknown:
        log(f"fastseg.bench: no benchmark cases for {unknown}; known: {sorted(OPS)}")
        return EXIT_USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted_backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    words = [w.strip() for w in args.cases.split(",")] if args.cases else None

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop()

    old_handler = signal.signal(signal.SIGTERM, on_term)
    info = machine_info(device)
    ext = (f"loaded {info['build_info'].get('compiled_backends')}" if info["extension_loaded"]
           else f"not loaded ({info['extension_error']})")
    print(f"fastseg.bench on {info['device_name']} ({device}), torch {torch.__version__}, "
          f"{info['threads']} threads, fastseg._C: {ext}", flush=True)
    load = info["loadavg_at_start"]
    if device.type == "cpu" and load and load[0] > 0.5:
        log(f"warning: the machine is busy (load average {load[0]:.2f} before the run): CPU timings of "
            "this run are unreliable, and penalise the many-small-ops eager baseline most")
    rows: list[_Row] = []
    skipped_backends: dict[str, dict[str, str]] = {}
    incomplete = ""
    ceilings: dict[str, Any] = {}
    probe: dict[str, Any] = {}
    try:
        probe = _memory_probe(device)
        if not probe.get("ok"):
            log(f"warning: memory probe off: {probe}")
        ceilings = _ceilings(device, dtypes, max(args.budget, 0.1))
        if ceilings:
            mm = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in ceilings.get("matmul_TFLOPs", {}).items())
            print(f"ceilings: copy {ceilings.get('copy_GBps', float('nan')):.0f} GB/s; matmul TFLOP/s: {mm}",
                  flush=True)
        cut: list[str] = []
        for i, op in enumerate(op_names):
            # With --time-limit every op gets an equal share of the time left (unused time rolls
            # over) and its first case whenever any time is left, so that a slow early op cannot
            # starve the later ones of every measurement.
            op_deadline, left = None, math.inf
            if args.time_limit is not None:
                left = args.time_limit - (time.monotonic() - started)
                op_deadline = time.monotonic() + max(left, 0.0) / (len(op_names) - i)
            backends, skipped = _usable_backends(op, device, wanted_backends)
            skipped_backends[op] = skipped
            for b, why in skipped.items():
                print(f"{op}: backend {b} not benchmarked: {why}", flush=True)
            cases = get_cases(op, batch=args.batch, quick=args.quick)
            if words:
                cases = [c for c in cases if any(w in c.name for w in words)]
            todo = [(case, dtype) for case in cases for dtype in dtypes]
            for k, (case, dtype) in enumerate(todo):
                if op_deadline is not None and time.monotonic() > op_deadline and (k > 0 or left <= 0):
                    cut.append(f"{op} {k}/{len(todo)}")
                    incomplete = f"time limit of {args.time_limit:g} s; cases run (of all) where cut: {', '.join(cut)}"
                    print(f"{op}: its share of --time-limit is spent after {k} of {len(todo)} cases", flush=True)
                    break
                t0 = time.monotonic()
                new = _bench_case(case, dtype, device, backends, args, log)
                copy_bw = ceilings.get("copy_GBps")
                for r in new:
                    if r.GBps is not None and isinstance(copy_bw, float):
                        r.pct_copy_bw = 100.0 * r.GBps / copy_bw
                rows += new
                summary = ", ".join(f"{r.backend} {r.speedup:.2f}x" if r.speedup else f"{r.backend} {r.status}"
                                    for r in new)
                print(f"  {case.label} [{_dtype_name(dtype)}] {case.params.get('shape', '')}: {summary} "
                      f"({time.monotonic() - t0:.1f} s)", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except (_Stop, KeyboardInterrupt):
        incomplete = incomplete or "interrupted (SIGTERM / Ctrl-C)"
        log(f"fastseg.bench: stopped early: {incomplete}; writing partial results")
    finally:
        signal.signal(signal.SIGTERM, old_handler)

    failures = [r for r in rows if r.status in ("FAIL", "ERROR")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    which = "all" if set(op_names) == set(OPS) else "-".join(op_names)
    stem = f"{device.type}-{which}" + ("-quick" if args.quick else "")
    result = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "settings": {"device": str(device), "dtypes": [_dtype_name(d) for d in dtypes], "batch": args.batch,
                     "quick": args.quick, "budget_s": args.budget, "min_reps": args.min_reps, "rounds": args.rounds,
                     "check": not args.no_check, "atol": {_dtype_name(k): v for k, v in ATOL.items()},
                     "baseline": "fastseg.ops._reference (eager PyTorch composition) unless a case's params name "
                                 "another"},
        "machine": info,
        "memory_probe": probe,
        "ceilings": ceilings,
        "skipped_backends": skipped_backends,
        "incomplete": incomplete or None,
        "elapsed_s": round(time.monotonic() - started, 1),
        "loadavg_at_end": _loadavg(),
        "results": [dataclasses.asdict(r) for r in rows],
    }
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    _write_csv(out_dir / f"{stem}.csv", rows)
    why_no_plot = None if args.no_plot else _plot(
        out_dir / f"{stem}.png", rows,
        f"fastseg vs eager PyTorch on {info['device_name']} (torch {torch.__version__}, batch {args.batch})")
    print()
    print(_table(rows, device))
    print()
    print(f"wrote {json_path}, {stem}.csv" + ("" if args.no_plot or why_no_plot else f", {stem}.png")
          + (f" (no plot: {why_no_plot})" if why_no_plot else "") + f" in {result['elapsed_s']} s")
    if failures:
        log(f"fastseg.bench: {len(failures)} FAILED: "
            + "; ".join(f"{r.case} {r.dtype} {r.backend}: {r.status} {r.message}" for r in failures))
        return EXIT_FAILED
    if incomplete:
        return EXIT_INCOMPLETE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
