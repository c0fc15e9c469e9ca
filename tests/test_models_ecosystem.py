"""Every semantic model of the registry through the PyTorch ecosystem: ``torch.compile(fullgraph=True)``,
``torch.export.export``, bf16 autocast on CPU and channels_last, each equal to eager float32.

New registry entries are picked up automatically: ``SMALL`` (the one place to list them) gives a model a
small configuration; a name not in it is built with its defaults. Every semantic model of the registry
(``list_models("semantic")``: eval output ``{"out": logits}``) is tested; instance/panoptic models take
lists of images and have their own tests.
Inputs are small and odd-sized; BatchNorm statistics are calibrated and zero-initialised parameters
(FCN's score layers, DANet's gammas) randomised so that no comparison is vacuous."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import fastseg.nn.conv as conv_module
from fastseg import ops
from fastseg.models import create_model, list_models
from fastseg.nn import SeparableConv2d

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 3, 33, 41)  # odd sizes on purpose


def _fewer_middle_units(model: nn.Module) -> None:
    model.backbone.middle = model.backbone.middle[:2]  # identical Xception units; fewer of them to trace


@dataclass(frozen=True)
class Small:
    kwargs: dict[str, Any] = field(default_factory=dict)
    shrink: Callable[[nn.Module], None] | None = None  # structural cuts create_model has no argument for


# The one place that knows the models: small configurations of the registry's entries.
SMALL: dict[str, Small] = {
    "unet": Small({"in_channels": 3, "padding": "same", "batch_norm": True, "base_channels": 4}),
    "fcn32s": Small({"widths": (4, 4, 8, 8, 8), "fc_channels": 16}),
    "fcn16s": Small({"widths": (4, 4, 8, 8, 8), "fc_channels": 16}),
    "fcn8s": Small({"widths": (4, 4, 8, 8, 8), "fc_channels": 16}),
    "deeplabv2": Small({"backbone": "resnet50"}),
    "deeplabv3": Small({"backbone": "resnet50", "aux_loss": True}),
    "deeplabv3plus": Small({"width_multiplier": 0.125}, _fewer_middle_units),
    "pspnet": Small({"backbone": "resnet50"}),
    "espnet": Small({"num_classes": 5}),  # its decoder's ESP module splits the classes over 5 branches
}


def _build(name: str) -> nn.Module:
    small = SMALL.get(name, Small())
    torch.manual_seed(0)
    model = create_model(name, **{"num_classes": 3, **small.kwargs})
    if small.shrink is not None:
        small.shrink(model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().max() > 0:
                p.normal_(0, 0.5)
    return model.eval()


def _calibrate(model: nn.Module) -> nn.Module:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # the plain average of the calibration pass
    model.train()
    with torch.no_grad():
        model(torch.randn(2, *SHAPE[1:]))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module", params=list_models("semantic"))
def semantic(request) -> tuple[str, nn.Module, torch.Tensor, torch.Tensor]:
    """(name, eval model, input, eager float32 logits) of each semantic model of the registry."""
    name = request.param
    model = _build(name)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    _calibrate(model)
    with torch.no_grad():
        out = model(x)
    assert out["out"].shape[-2:] == x.shape[-2:] and out["out"].abs().max() > 0
    return name, model, x, out["out"]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def _has_fused_blocks(model: nn.Module) -> bool:
    return any(isinstance(m, SeparableConv2d) for m in model.modules())


def test_compile_fullgraph_equals_eager(semantic):
    # aot_eager: dynamo capture without graph breaks + fake kernels and autograd tracing of the fused
    # ops; inductor's C++ codegen would take minutes per model on a 2-core machine and checks no more.
    name, model, x, ref = semantic
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(x)["out"]
    # aot_eager decomposes BatchNorm/ReLU differently from eager: rounding differences through the net
    assert _rel(out, ref) < 1e-3, name


def test_export_equals_eager_and_keeps_fused_ops(semantic):
    name, model, x, ref = semantic
    exported = torch.export.export(model, (x,))
    if _has_fused_blocks(model):
        assert "fastseg.separable_conv2d" in str(exported.graph), "the fused op should stay one node"
    with torch.no_grad():
        out = exported.module()(x)["out"]
    assert _rel(out, ref) < 1e-4, name


def test_autocast_bf16_cpu(semantic, monkeypatch):
    name, model, x, ref = semantic
    calls = []
    real = conv_module.separable_conv2d
    monkeypatch.setattr(conv_module, "separable_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        n_fused = len(calls)
        with ops.use_backend("reference"):
            out_ref = model(x)["out"]
    assert all(torch.isfinite(v).all() for v in out.values() if isinstance(v, torch.Tensor))
    assert out["out"].dtype in (torch.bfloat16, torch.float32)
    # the design's ratio rule against the float32 eager logits: bf16 through a random calibrated deep net
    # drifts far (tens of % on ResNet-50), the fused path must not drift more than the unfused one
    err, ref_err = _rel(out["out"], ref), _rel(out_ref, ref)
    assert err <= 2 * ref_err + 1e-3, f"{name}: bf16 error {err:.3g} > 2 x reference backend's {ref_err:.3g}"
    assert bool(n_fused) == _has_fused_blocks(model)


def test_channels_last(semantic):
    name, model, x, ref = semantic
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model_cl(x.contiguous(memory_format=torch.channels_last))["out"]
    assert _rel(out, ref) < 1e-4, name


def test_separable_conv2d_under_cpu_autocast_runs_the_fp32_kernel():
    from fastseg.ops import separable_conv2d

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 11, 13, generator=g).bfloat16()  # what a preceding conv gives under autocast
    dw, pw = torch.randn(6, 1, 3, 3, generator=g), torch.randn(5, 6, 1, 1, generator=g)
    scale, shift = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = separable_conv2d(x, dw, pw, dilation=2, pw_scale=scale, pw_shift=shift, relu=True)
    want = separable_conv2d(x.float(), dw, pw, dilation=2, pw_scale=scale, pw_shift=shift, relu=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="dw_weight dtype"):  # outside autocast mixed dtypes stay an error
        separable_conv2d(x, dw, pw)
