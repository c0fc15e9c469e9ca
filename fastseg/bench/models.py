"""End-to-end model rows (op ``"models"``, backend ``"fused"``): inference latency of each architecture of
``fastseg.models.list_models()``, fused (the default backends) against the same weights under
``fastseg.ops.use_backend("reference")`` (the model's unfused self), and against segmentation-models-pytorch's
DeepLabV3Plus / PSPNet / Unet (``encoder_weights=None``) as peer baselines in rows of their own
(``<model>_vs_smp``; the peer is named in the row's ``baseline`` and ``peer`` params).

- Input: RGB (U-Net too: ``in_channels=3``), 513x513 (ESPNet: 1024x512 and 20 classes, its Cityscapes
  setting), DANet at 512x512 and 768x768 (two rows: its eager N×N attention map is the memory
  story), batch ``batch`` on CPU and ``CUDA_BATCH`` x ``batch`` on CUDA; U-Net in valid mode at 508x508
  (the valid size nearest 513; 324x324 out); the peer rows at 512x512 (smp needs sides divisible by its
  output stride). ``--quick``: a quarter-width DeepLab v3+ at 97x97 only. The budgeted (default CPU) run takes
  every row on a smaller input (193x193, U-Net valid 204x204, peers 192x192, other sizes scaled alike: the
  case's ``budget_variant``); ``--full`` at the sizes above.
- Weights: seeded random init; BatchNorm statistics from one train-mode pass over two random images, so
  that activations have a trained network's scale (raw init overflows fp16 in a ResNet-101).
- Correctness: the fused output against the reference backend's, and the oracle is the reference backend
  on the model in float64 (``model.double()``), with the harness's ratio rule; the peer rows check the same.
- Instance models (SOLO, decoupled SOLO, SOLOv2; ResNet-50-FPN, 80 COCO classes): RGB images in 0..1 at
  ``INSTANCE_SIZE`` (800x1216, SOLO's test scale with sides divisible by 32), the model's whole inference
  (network, candidates, masks, Matrix NMS, upsampling). A randomly initialised head predicts every class at its
  0.01 prior, so no cell would pass the 0.1 score threshold: the class biases are shifted so that about
  ``INSTANCE_CANDIDATES`` cells pass it (the cut placed in the widest score gap near that rank, so rounding does
  not change the set), the mask biases set so that random masks cover about half the image. The check compares
  the kept instances' scores.
- Models are built when a case runs, not when the cases are listed: a model whose module does not exist yet
  (or a peer whose library is not installed) is reported as skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastseg import ops
from fastseg.bench.cases import Case, Inputs, SkipCase, register_op
from fastseg.models import create_model, list_models

__all__ = ["AUNET_SIZE", "BUDGET_PEER_SIZE", "BUDGET_SIZE", "BUDGET_UNET_VALID_SIZE", "CUDA_BATCH", "DANET_SIZES",
           "ESPNET_CLASSES", "ESPNET_SIZE", "INSTANCE_CANDIDATES", "INSTANCE_MODELS", "INSTANCE_SIZE", "PEER_SIZE",
           "QUICK_SIZE", "SIZE", "UNET_VALID_SIZE", "aunet_time_shares", "budget_size", "model_cases"]

NUM_CLASSES = 21  # PASCAL VOC
SIZE = 513  # DeepLab's evaluation crop
PEER_SIZE = 512  # smp models need sides divisible by their output stride (16/32)
QUICK_SIZE = 97
QUICK_WIDTH = 0.25  # DeepLab v3+ (Xception-65) with a quarter of the channels: 2.7 M parameters
CUDA_BATCH = 8
ESPNET_SIZE = (512, 1024)  # (H, W): ESPNet's Cityscapes resolution
ESPNET_CLASSES = 20  # ESPNet's Cityscapes classes (19 + background)
UNET_VALID_SIZE = 508  # the valid U-Net input (16k + 124) nearest 513; its output is 184 px smaller
DANET_SIZES = (512, 768)  # DANet rows: fused attention vs the eager N×N one, where memory matters
INSTANCE_MODELS = tuple(list_models("instance"))
INSTANCE_SIZE = (800, 1216)
INSTANCE_CLASSES = 80  # COCO
INSTANCE_CANDIDATES = 500  # cells above the score threshold: SOLOv2's nms_pre
# The budgeted (default CPU) run: whole models at about a seventh of the pixels (on two cores a 513x513
# row's float64 check, single timed calls and memory call alone take one to two minutes, over a dozen
# rows); ``--full``: the sizes above.
BUDGET_SIZE = 193  # 12 x 16 + 1, like 513 = 32 x 16 + 1
BUDGET_PEER_SIZE = 192  # divisible by smp's output strides
BUDGET_UNET_VALID_SIZE = 204  # a valid U-Net input (16k + 124), 20x20 out
_REFERENCE = "_reference backend (same model and weights)"
_WEIGHTS = "seeded random init; BatchNorm statistics from one train-mode pass over 2 random images"
_OWN_ROWS = set(list_models("panoptic"))  # not semantic logits of a tensor: rows of their own below
AUNET_SIZE = (800, 1216)  # a COCO image at Mask R-CNN's test scale (short side 800), a multiple of 32


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
    width: int | None = None  # input width when not square (size is then the height)
    instance: bool = False  # a list-of-images model returning per-image dicts
    swap: bool = False  # "fused" is the peer after fastseg.nn.fuse_modules (not our model)


def _rows() -> list[_ModelRow]:
    """One row per registered model at its defaults (DeepLab v3+, the issue's headline, first: it runs even
    when ``--time-limit`` leaves a single case), the peers, the small quick row (sizes read when the cases
    are made)."""
    rows = []
    for name in sorted(list_models(), key=lambda n: n != "deeplabv3plus"):
        if name in _OWN_ROWS:
            continue
        if name in INSTANCE_MODELS:
            h, w = INSTANCE_SIZE
            rows.append(_ModelRow(name, name, {"backbone": "resnet50"}, h,
                                  f"{h}x{w} RGB in 0..1, ResNet-50-FPN, {INSTANCE_CLASSES} classes, about "
                                  f"{INSTANCE_CANDIDATES} candidates", width=w, instance=True))
        elif name.startswith("espnet"):
            rows.append(_ModelRow(name, name, {"num_classes": ESPNET_CLASSES}, ESPNET_SIZE[0],
                                  f"{ESPNET_SIZE[1]}x{ESPNET_SIZE[0]} (Cityscapes; the published 112 FPS is on a "
                                  f"TitanX at this size), {ESPNET_CLASSES} classes", width=ESPNET_SIZE[1]))
        elif name == "unet":
            rows.append(_ModelRow(name, name, {"padding": "valid", "in_channels": 3}, UNET_VALID_SIZE,
                                  f"padding='valid' at {UNET_VALID_SIZE}x{UNET_VALID_SIZE}, the valid input size "
                                  f"nearest {SIZE} ({UNET_VALID_SIZE - 184}x{UNET_VALID_SIZE - 184} out)"))
        elif name == "danet":  # the sizes: N = 64² and 96² attention positions at output stride 8
            rows += [_ModelRow(f"danet_{side}", name, {}, side, f"{side}x{side}, ResNet-101 OS8, {NUM_CLASSES} classes")
                     for side in DANET_SIZES]
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
        _ModelRow("smp_deeplabv3plus_swapped_vs_smp", "smp", {}, PEER_SIZE, note,
                  _Peer("DeepLabV3Plus", {"encoder_name": "tu-xception65", "encoder_output_stride": 16,
                                          "decoder_atrous_rates": (6, 12, 18)},
                        "the same smp model after fastseg.nn.fuse_modules (its separable convs, timm's Xception "
                        "blocks included, become fastseg SeparableConv2d with the same weights)"), swap=True),
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

    @property
    def float32(self) -> nn.Module:
        return self._by_dtype[torch.float32]

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype not in self._by_dtype:
            self._by_dtype[x.dtype] = copy.deepcopy(self._by_dtype[torch.float32]).to(x.dtype)
        return _logits(self._by_dtype[x.dtype](x))


class _InstanceWeights(_Weights):
    """As :class:`_Weights` for an instance model: called on a batch ``x`` [N, 3, H, W], it runs the model on
    ``list(x)`` and returns the kept instances' scores of every image, concatenated."""

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype not in self._by_dtype:
            self._by_dtype[x.dtype] = copy.deepcopy(self._by_dtype[torch.float32]).to(x.dtype)
        with torch.no_grad():
            return torch.cat([o["scores"] for o in self._by_dtype[x.dtype](list(x))])


def _calibrate_candidates(model: nn.Module, x: Tensor, count: int) -> None:
    """Shift ``model``'s class biases so that about ``count`` cells (after points NMS) of ``x[0]`` pass its
    score threshold, the cut in the widest gap of the sorted scores within ``count`` ± 10%; mask biases 0
    (decoupled SOLO: 1, sigmoid(1)² ≈ 0.5) so that random masks cover about half the image."""
    with torch.no_grad():
        levels = model._levels(model.backbone(model._batch(list(x[:1]))))
        scores = []
        for level, grid in zip(levels, model.grids, strict=True):
            logits = model._category(level, grid)
            local_max = F.max_pool2d(logits, 2, stride=1, padding=1)[..., :-1, :-1]
            scores.append(logits.masked_fill(local_max != logits, -math.inf).flatten())
        spread = max(count // 10, 1)
        top = torch.cat(scores).topk(count + spread).values[count - spread:]
        i = int((top[:-1] - top[1:]).argmax())
        cut = (top[i] + top[i + 1]) / 2
        thr = min(max(model.score_thr, 1e-6), 1 - 1e-6)
        model.conv_cls.bias += math.log(thr / (1 - thr)) - cut
        for name, p in model.named_parameters():
            if name.startswith("conv_mask") and name.endswith("bias"):
                p.fill_(1.0 if name.startswith(("conv_mask_x", "conv_mask_y")) else 0.0)


def _build_instance(factory: Callable[[], nn.Module], calibration: Tensor, x: Tensor,
                    device: torch.device) -> _InstanceWeights:
    """An instance model from ``factory()``, seeded, on ``device``: the backbone's BatchNorm statistics from
    ``calibration`` (normalised as the model does), then the candidates calibrated on ``x``."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        try:
            model = factory()
        except ModuleNotFoundError as e:
            raise SkipCase(f"cannot build: {e}") from e
        model = model.to(device)
        _calibrate_batchnorm(model.backbone, model._batch(list(calibration.to(device))))
        model.eval()
        _calibrate_candidates(model, x.to(device=device, dtype=torch.float32), INSTANCE_CANDIDATES)
    return _InstanceWeights(model)


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
        w = row.width or row.size
        if row.instance:
            x = torch.rand(n, 3, row.size, w, generator=g)
            calibration = torch.rand(2, 3, row.size, w, generator=g)
            factory = lambda: create_model(row.model, num_classes=INSTANCE_CLASSES, **row.kwargs)  # noqa: E731
            return {"x": x.to(device=device, dtype=dtype), "model": _build_instance(factory, calibration, x, device)}
        x = torch.randn(n, 3, row.size, w, generator=g)
        calibration = torch.randn(2, 3, row.size, w, generator=g)
        kwargs = {"num_classes": NUM_CLASSES, **row.kwargs}
        inputs: Inputs = {"x": x.to(device=device, dtype=dtype)}
        if not row.swap:
            inputs["model"] = _build(lambda: create_model(row.model, **kwargs), calibration, device)
        if row.peer is not None:
            peer = row.peer
            inputs["peer"] = _build(lambda: _peer_model(peer), calibration, device)
        if row.swap:
            from fastseg.nn import fuse_modules

            inputs["model"] = _Weights(fuse_modules(inputs["peer"].float32)[0])
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
    width = None if row.width is None else budget_size(row.width)
    full, small = f"{row.width or row.size}x{row.size}", f"{width or size}x{size}"
    note = (row.note or full).replace(full, small).replace(str(row.size), str(size))
    if row.model == "unet" and row.kwargs.get("padding") == "valid":
        note = f"padding='valid' at {size}x{size} ({size - 184}x{size - 184} out)"
    return replace(row, size=size, width=width, note=f"{note}; budgeted run ({full} with --full)")


def _model_case(row: _ModelRow, batch: int) -> Case:
    small = _budget_row(row)
    variant = None if small is None else (lambda: _model_case(small, batch))
    s, w = row.size, row.width or row.size
    layer = f"smp.{row.peer.cls} swapped by fuse_modules" if row.swap and row.peer else row.model
    params: dict[str, Any] = {
        "layer": f"{layer} end to end, inference (eval)", "model": row.model, "kwargs": dict(row.kwargs),
        "N": batch, "N_cuda": CUDA_BATCH * batch, "H": s, "W": w, "input": row.note or f"{s}x{w}",
        "shape": f"{batch}x3x{s}x{w} (CUDA: {CUDA_BATCH * batch}x3x{s}x{w})",
        "classes": INSTANCE_CLASSES if row.instance else row.kwargs.get("num_classes", NUM_CLASSES),
        "weights": _WEIGHTS + ("; class and mask biases calibrated (module doc)" if row.instance else ""),
        "baseline": _REFERENCE,
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


# ---- AUNet (panoptic) ----------------------------------------------------------------------------------


def aunet_time_shares(model: nn.Module, images: list[Tensor], backend: str | None = None) -> dict[str, float]:
    """Wall time of one eval forward of an AUNet and the part of it spent in RoIAlign (the box and mask
    poolers), RoIUpsample (the MAM's, all levels) and the attention modules (PAM and MAM: conv, 1 - sigmoid,
    update, re-weighting), measured with forward hooks on those modules (synchronised on CUDA).
    ``backend``: run under ``fastseg.ops.use_backend(backend)`` (None: the default, fused, choice)."""
    groups = {"roi_align": [model.roi_heads.box_roi_pool, model.mask_roi_pool],
              "roi_upsample": list(model.mam_upsample), "attention": [*model.pam, *model.mam]}
    cuda = images[0].is_cuda

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    spent = dict.fromkeys(groups, 0.0)
    started: dict[int, float] = {}
    handles = []
    for name, modules in groups.items():
        for m in modules:
            handles.append(m.register_forward_pre_hook(lambda mod, args: started.__setitem__(id(mod), now())))
            handles.append(m.register_forward_hook(
                lambda mod, args, out, name=name: spent.__setitem__(name, spent[name] + now() - started[id(mod)])))
    try:
        with torch.no_grad(), ops.use_backend(backend) if backend else contextlib.nullcontext():
            t0 = now()
            model(images)
            total = now() - t0
    finally:
        for h in handles:
            h.remove()
    return {"total_s": total, **{f"{k}_s": v for k, v in spent.items()},
            **{f"{k}_share": v / total for k, v in spent.items()}}


def _aunet_case(batch: int, size: tuple[int, int] = AUNET_SIZE) -> Case:
    h, w = size
    small = (budget_size(h), budget_size(w))
    variant = None if small == size else (lambda: _aunet_case(batch, small))
    params: dict[str, Any] = {
        "layer": "aunet end to end, inference (eval), per image", "model": "aunet",
        "kwargs": {"backbone": "resnet50", "num_classes": 80, "num_stuff_classes": 53, "box_score_thresh": 0.0,
                   "norm_layer": "BatchNorm2d"},
        "N": batch, "H": h, "W": w, "input": f"{h}x{w} (no resize: min_size {h}, max_size 1333)",
        "shape": f"{batch} images 3x{h}x{w}",
        "weights": "seeded random init; backbone BatchNorm statistics from one train-mode pass over 2 random images; "
                   "box_score_thresh=0 keeps 100 detections an image (the mask head's and MAM's full load)",
        "baseline": _REFERENCE,
        "check": "float32 only, boxes and scores against the reference backend in float32 (a float64 copy would be "
                 "a different detector: top-k and NMS choices flip). The stuff logits are not compared: they are "
                 "discontinuous in the boxes (RoIAlign's adaptive grid ceil(bin), the MAM's summed RoIUpsample), "
                 "so float32 rounding of the boxes moves them by up to ~7% of their max with random weights "
                 "(tests/test_models_aunet.py checks the semantic map of a small model exactly)",
    }

    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        if dtype != torch.float32:
            raise SkipCase("the AUNet row runs in float32 only")
        g = torch.Generator().manual_seed(1216)
        x = torch.rand(batch, 3, h, w, generator=g)
        calibration = torch.rand(2, 3, h, w, generator=g)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            model = create_model("aunet", num_classes=80, num_stuff_classes=53, backbone="resnet50",
                                 box_score_thresh=0.0, norm_layer=nn.BatchNorm2d).to(device)
            _calibrate_batchnorm(model.backbone.body, calibration.to(device))
            model.eval()
        images = list(x.to(device))
        # Where the time goes, fused and unfused (one warm-up forward first): recorded in the row's params.
        aunet_time_shares(model, images)
        params["time_shares"] = {"fused": aunet_time_shares(model, images),
                                 "reference": aunet_time_shares(model, images, "reference")}
        return {"x": x.to(device), "aunet": model}

    def outputs(inputs: Inputs) -> tuple[Tensor, ...]:
        res = inputs["aunet"](list(inputs["x"].float()))
        return torch.cat([r["boxes"] for r in res]), torch.cat([r["scores"] for r in res])

    def unfused(inputs: Inputs) -> tuple[Tensor, ...]:
        with ops.use_backend("reference"):
            return outputs(inputs)

    return Case("models", f"aunet_r50_{h}x{w}", "fwd", params, make, unfused, lambda inputs, backend: outputs(inputs),
                rounds=1, min_reps=3, warmup=0, budget_variant=variant)


@register_op("models", backends=lambda device: ["fused"])
def model_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """Every model of ``fastseg.models.list_models()`` at 513x513 (U-Net valid: 508x508; ESPNet, DANet and the
    instance models at their own sizes), four rows against segmentation-models-pytorch peers at 512x512, smp's
    DeepLabV3Plus after ``fastseg.nn.fuse_modules`` against itself, a small DeepLab v3+ at 97x97 (``quick``),
    and AUNet-R50 at 800x1216 with its RoIAlign/RoIUpsample/attention time shares; built lazily."""
    own = [_aunet_case(batch)] if "aunet" in list_models() else []
    return [_model_case(row, batch) for row in _rows()] + own
