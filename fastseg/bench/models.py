"""End-to-end model rows (op ``"models"``, backend ``"fused"``): inference latency of each architecture of
``fastseg.models.list_models()``, fused (the default backends) against the same weights under
``fastseg.ops.use_backend("reference")`` (the model's unfused self), and against segmentation-models-pytorch's
DeepLabV3Plus / PSPNet / Unet (``encoder_weights=None``) as peer baselines in rows of their own
(``<model>_vs_smp``; the peer is named in the row's ``baseline`` and ``peer`` params).

- Input: RGB (U-Net too: ``in_channels=3``), 513x513, batch ``batch`` on CPU and ``CUDA_BATCH`` x ``batch``
  on CUDA; U-Net in valid mode at 508x508 (the valid size nearest 513; 324x324 out); the peer rows at
  512x512 (smp needs sides divisible by its output stride). ``--quick``: a quarter-width DeepLab v3+ at
  97x97 only. The budgeted (default CPU) run takes every row on a smaller input (193x193, U-Net valid
  204x204, peers 192x192: the case's ``budget_variant``); ``--full`` at the sizes above.
- Weights: seeded random init; BatchNorm statistics from one train-mode pass over two random images, so
  that activations have a trained network's scale (raw init overflows fp16 in a ResNet-101).
- Correctness: the fused output against the reference backend's, and the oracle is the reference backend
  on the model in float64 (``model.double()``), with the harness's ratio rule; the peer rows check the same.
- Models are built when a case runs, not when the cases are listed: a model whose module does not exist yet
  (or a peer whose library is not installed) is reported as skipped, with the reason.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from fastseg import ops
from fastseg.bench.cases import Case, Inputs, SkipCase, register_op
from fastseg.models import create_model, list_models

__all__ = ["BUDGET_PEER_SIZE", "BUDGET_SIZE", "BUDGET_UNET_VALID_SIZE", "CUDA_BATCH", "PEER_SIZE", "QUICK_SIZE", "SIZE",
           "UNET_VALID_SIZE", "budget_size", "model_cases"]

NUM_CLASSES = 21  # PASCAL VOC
SIZE = 513  # DeepLab's evaluation crop
PEER_SIZE = 512  # smp models need sides divisible by their output stride (16/32)
QUICK_SIZE = 97
QUICK_WIDTH = 0.25  # DeepLab v3+ (Xception-65) with a quarter of the channels: 2.7 M parameters
CUDA_BATCH = 8
UNET_VALID_SIZE = 508  # the valid U-Net input (16k + 124) nearest 513; its output is 184 px smaller
# The budgeted (default CPU) run: whole models at about a seventh of the pixels (on two cores a 513x513
# row's float64 check, single timed calls and memory call alone take one to two minutes, over a dozen
# rows); ``--full``: the sizes above.
BUDGET_SIZE = 193  # 12 x 16 + 1, like 513 = 32 x 16 + 1
BUDGET_PEER_SIZE = 192  # divisible by smp's output strides
BUDGET_UNET_VALID_SIZE = 204  # a valid U-Net input (16k + 124), 20x20 out
_REFERENCE = "_reference backend (same model and weights)"
_WEIGHTS = "seeded random init; BatchNorm statistics from one train-mode pass over 2 random images"


@dataclass(frozen=True)
class _Peer:
    cls: str  # a segmentation_models_pytorch model class
    kwargs: dict[str, Any]
    note: str  # how it matches ours


@dataclass(frozen=True)
class _ModelRow:
    name: str  # the case's name
    model: str  # create_model's name
    kwargs: dict[str, Any]
    size: int
    note: str = ""  # what the input size means
    peer: _Peer | None = None
    quick: bool = False


def _rows() -> list[_ModelRow]:
    """One row per registered model at its defaults (DeepLab v3+, the issue's headline, first: it runs even
    when ``--time-limit`` leaves a single case), the peers, the small quick row (sizes read when the cases
    are made)."""
    rows = []
    for name in sorted(list_models(), key=lambda n: n != "deeplabv3plus"):
        if name == "unet":
            rows.append(_ModelRow(name, name, {"padding": "valid", "in_channels": 3}, UNET_VALID_SIZE,
                                  f"padding='valid' at {UNET_VALID_SIZE}x{UNET_VALID_SIZE}, the valid input size "
                                  f"nearest {SIZE} ({UNET_VALID_SIZE - 184}x{UNET_VALID_SIZE - 184} out)"))
        else:
            rows.append(_ModelRow(name, name, {}, SIZE))
    note = f"{PEER_SIZE}x{PEER_SIZE}: smp needs sides divisible by its output stride"
    return rows + [
        _ModelRow("deeplabv3plus_vs_smp", "deeplabv3plus", {"backbone": "xception65", "output_stride": 16},
                  PEER_SIZE, note,
                  _Peer("DeepLabV3Plus", {"encoder_name": "tu-xception65", "encoder_output_stride": 16,
                                          "decoder_atrous_rates": (6, 12, 18)},
                        "smp has no Xception-65 of its own: timm's Aligned Xception-65 through smp's timm encoder "
                        "(the closest); output stride 16, ASPP rates 6/12/18 as ours (smp's default 12/24/36); "
                        "smp's decoder has one separable 3x3 conv (ours two)")),
        _ModelRow("deeplabv3plus_resnet101_vs_smp", "deeplabv3plus", {"backbone": "resnet101", "output_stride": 16},
                  PEER_SIZE, note,
                  _Peer("DeepLabV3Plus", {"encoder_name": "resnet101", "encoder_output_stride": 16,
                                          "decoder_atrous_rates": (6, 12, 18)},
                        "ResNet-101 encoder, output stride 16, ASPP rates 6/12/18 as ours")),
        _ModelRow("pspnet_vs_smp", "pspnet", {"backbone": "resnet50"}, PEER_SIZE, note,
                  _Peer("PSPNet", {"encoder_name": "resnet50"},
                        "ResNet-50 encoder with smp's defaults: encoder_depth=3 (layers 1-2 only: stride 8 without "
                        "dilation, far less compute than the paper's dilated ResNet), upsampling 8")),
        _ModelRow("unet_vs_smp", "unet", {"padding": "same", "in_channels": 3}, PEER_SIZE,
                  note + "; ours with padding='same'",
                  _Peer("Unet", {"encoder_name": "vgg13"},
                        "smp has no plain U-Net encoder: VGG-13 is the closest to U-Net's contracting path (two "
                        "3x3 convs a stage, no BatchNorm); smp's decoder (BatchNorm, 256..16 channels)")),
        _ModelRow(f"deeplabv3plus_w{QUICK_WIDTH:g}_{QUICK_SIZE}", "deeplabv3plus", {"width_multiplier": QUICK_WIDTH},
                  QUICK_SIZE, f"{QUICK_SIZE}x{QUICK_SIZE}, every channel count x{QUICK_WIDTH:g}: the small --quick row",
                  quick=True),
    ]


def _logits(out: Any) -> Tensor:
    """A semantic model's logits: ``out["out"]`` of fastseg's models, the tensor smp's return."""
    if isinstance(out, dict):
        return out["out"]
    if isinstance(out, Tensor):
        return out
    raise TypeError(f"expected a dict with 'out' or a tensor from the model, got {type(out).__name__}")


class _Weights:
    """A model (float32, eval) and its copies in other dtypes, made on first use: called on ``x``, it runs
    the copy of ``x``'s dtype (float64 for the oracle) and returns the logits."""

    def __init__(self, model: nn.Module) -> None:
        self._by_dtype = {torch.float32: model}

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype not in self._by_dtype:
            self._by_dtype[x.dtype] = copy.deepcopy(self._by_dtype[torch.float32]).to(x.dtype)
        return _logits(self._by_dtype[x.dtype](x))


def _calibrate_batchnorm(model: nn.Module, x: Tensor) -> None:
    """Running statistics of every BatchNorm from one train-mode pass over ``x`` (their plain average:
    momentum None during the pass); the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def _build(factory: Callable[[], nn.Module], calibration: Tensor, device: torch.device) -> _Weights:
    """``factory()`` seeded, on ``device``, BatchNorms calibrated; a missing module means skipped."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the global RNGs untouched
        torch.manual_seed(0)
        try:
            model = factory()
        except ModuleNotFoundError as e:
            raise SkipCase(f"cannot build: {e}") from e
        model = model.to(device)
        _calibrate_batchnorm(model, calibration.to(device))
    return _Weights(model)


def _peer_model(peer: _Peer) -> nn.Module:
    import segmentation_models_pytorch as smp

    return getattr(smp, peer.cls)(**peer.kwargs, encoder_weights=None, classes=NUM_CLASSES)


def _model_inputs(row: _ModelRow, batch: int) -> Callable[[torch.device, torch.dtype], Inputs]:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        n = batch * (CUDA_BATCH if device.type == "cuda" else 1)
        g = torch.Generator().manual_seed(sum(map(ord, row.name)) * 7919 + n)
        x = torch.randn(n, 3, row.size, row.size, generator=g)
        calibration = torch.randn(2, 3, row.size, row.size, generator=g)
        inputs: Inputs = {
            "x": x.to(device=device, dtype=dtype),
            "model": _build(lambda: create_model(row.model, num_classes=NUM_CLASSES, **row.kwargs), calibration,
                            device),
        }
        if row.peer is not None:
            peer = row.peer
            inputs["peer"] = _build(lambda: _peer_model(peer), calibration, device)
        return inputs
    return make


def _unfused(inputs: Inputs) -> Tensor:
    with ops.use_backend("reference"):
        return inputs["model"](inputs["x"])


def _fused(inputs: Inputs, backend: str) -> Tensor:
    """``backend`` is ``"fused"``: the default choice of every op (what a user gets)."""
    return inputs["model"](inputs["x"])


def _smp(inputs: Inputs) -> Tensor:
    return inputs["peer"](inputs["x"])


def budget_size(size: int) -> int:
    """The budgeted run's input side for a row at ``size``: the table above for the known sizes; any other
    side above ``BUDGET_SIZE`` scaled by ``BUDGET_SIZE / SIZE`` to the nearest value with the same remainder
    modulo 32 (a side of the form 16k + c, or divisible by an output stride up to 32, stays so)."""
    known = {SIZE: BUDGET_SIZE, PEER_SIZE: BUDGET_PEER_SIZE, UNET_VALID_SIZE: BUDGET_UNET_VALID_SIZE}
    if size in known:
        return min(known[size], size)
    if size <= BUDGET_SIZE:  # small already (the --quick row)
        return size
    target = size * BUDGET_SIZE / SIZE
    r = size % 32
    below = r + 32 * math.floor((target - r) / 32)
    best = min((below, below + 32), key=lambda v: abs(v - target))
    return best if 0 < best < size else size


def _budget_row(row: _ModelRow) -> _ModelRow | None:
    """``row`` at the budgeted run's size (None: already small)."""
    size = budget_size(row.size)
    if size >= row.size:
        return None
    note = (row.note or f"{row.size}x{row.size}").replace(str(row.size), str(size))
    if row.model == "unet" and row.kwargs.get("padding") == "valid":
        note = f"padding='valid' at {size}x{size} ({size - 184}x{size - 184} out)"
    return replace(row, size=size, note=f"{note}; budgeted run ({row.size}x{row.size} with --full)")


def _model_case(row: _ModelRow, batch: int) -> Case:
    small = _budget_row(row)
    variant = None if small is None else (lambda: _model_case(small, batch))
    s = row.size
    params: dict[str, Any] = {
        "layer": f"{row.model} end to end, inference (eval)", "model": row.model, "kwargs": dict(row.kwargs),
        "N": batch, "N_cuda": CUDA_BATCH * batch, "H": s, "W": s, "input": row.note or f"{s}x{s}",
        "shape": f"{batch}x3x{s}x{s} (CUDA: {CUDA_BATCH * batch}x3x{s}x{s})", "classes": NUM_CLASSES,
        "weights": _WEIGHTS, "baseline": _REFERENCE,
    }
    # A whole model takes seconds a call on CPU: one timing round, the first call as warm-up, three samples.
    timing: dict[str, Any] = {"rounds": 1, "min_reps": 3, "warmup": 0}
    make = _model_inputs(row, batch)
    if row.peer is None:
        return Case("models", row.name, "fwd", params, make, _unfused, _fused, quick=row.quick,
                    budget_variant=variant, **timing)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in row.peer.kwargs.items())
    params.update(baseline=f"smp.{row.peer.cls}",
                  peer=f"smp.{row.peer.cls}({kwargs}, encoder_weights=None): {row.peer.note}")
    return Case("models", row.name, "fwd", params, make, _smp, _fused, quick=row.quick, check_against=_unfused,
                budget_variant=variant, **timing)


@register_op("models", backends=lambda device: ["fused"])
def model_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """Every model of ``fastseg.models.list_models()`` at 513x513 (U-Net valid: 508x508), four rows against
    segmentation-models-pytorch peers at 512x512, and a small DeepLab v3+ at 97x97 (``quick``); built lazily."""
    return [_model_case(row, batch) for row in _rows()]
