"""ESPNet-A/B/C and ESPNet: parameter counts, shapes, fused vs reference, gradients, overfitting,
the ESP module, argument checks."""

from __future__ import annotations

import pytest
import torch
from test_models_deeplab_pspnet import _calibrate_bn, overfit_miou
from torch import nn
from torch.nn import functional as F

from fastseg import ops
from fastseg.models import create_model
from fastseg.models.espnet import ESPNet
from fastseg.nn import ESPModule
from fastseg.ops import _reference

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ["espnet_a", "espnet_b", "espnet_c", "espnet"]


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- counts

def _cbr(cin: int, cout: int, k: int) -> int:  # conv (no bias) + BN + PReLU
    return cin * cout * k * k + 3 * cout


def _esp(cin: int, cout: int, stride: int = 1) -> int:
    """reduce (1×1, or 3×3 when strided) to n = cout // 5; five 3×3 branches n → (cout - 4n, n, n, n, n)
    = cout outputs from n inputs each; BN + PReLU on cout."""
    n = cout // 5
    return cin * n * (9 if stride == 2 else 1) + 9 * cout * n + 3 * cout


def _expected(variant: str, classes: int = 20, a2: int = 2, a3: int = 8, img: int = 3) -> int:
    shortcut, reinforce = variant != "a", variant in ("c", "full")
    r = img if reinforce else 0
    total = _cbr(img, 16, 3) + (3 * (16 + r) if reinforce else 0)  # level 1 (+ BR over the concat)
    total += _esp(16 + r, 64, 2) + a2 * _esp(64, 64)
    l2 = 128 + r if shortcut else 64
    total += 3 * l2 if shortcut else 0
    total += _esp(l2, 128, 2) + a3 * _esp(128, 128)
    l3 = 256 if shortcut else 128
    total += (3 * l3 if shortcut else 0) + l3 * classes  # BR + 1×1 classifier
    if variant == "full":
        c = classes
        total += 2 * c  # BN on the 1/8 logits
        total += 3 * c * c * 4  # three 2×2 deconvolutions
        total += l2 * c  # 1×1 projection of level 2
        total += 3 * 2 * c + _esp(2 * c, c)  # BR + ESP module fusing level 2 and 3
        total += 3 * c  # BR after the second deconvolution
        total += _cbr(16 + c, c, 3)  # fusion with level 1
    return total


def test_param_counts():
    """The counts at the paper's defaults, derived layer by layer above. espnet_c = 349,449 and espnet =
    364,569 are also the parameter counts (BatchNorm buffers excluded) of the authors' released
    Cityscapes checkpoints pretrained/encoder/espnet_p_2_q_8.pth and pretrained/decoder/espnet_p_2_q_8.pth
    (sacmehta/ESPNet), the published "0.364 M"."""
    counts = {name: _n(create_model(name)) for name in VARIANTS}
    assert counts == {"espnet_a": 330_272, "espnet_b": 348_384, "espnet_c": 349_449, "espnet": 364_569}
    assert counts == {name: _expected(v) for name, v in zip(VARIANTS, ["a", "b", "c", "full"], strict=True)}
    assert _n(create_model("espnet", num_classes=19, alpha2=5, alpha3=3)) == _expected("full", 19, 5, 3)


# ---------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [(37, 53), (8, 8), (1, 13), (64, 24)])
def test_output_shapes(name, size):
    torch.manual_seed(1)
    model = create_model(name, num_classes=7, alpha2=1, alpha3=2)
    x = torch.randn(2, 3, *size)
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            out = model(x)
        assert set(out) == {"out"}
        assert out["out"].shape == (2, 7, *size)
        assert torch.isfinite(out["out"]).all()


def test_in_channels_and_defaults():
    model = create_model("espnet", in_channels=1, num_classes=5, alpha2=0, alpha3=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 17, 19))["out"].shape == (1, 5, 17, 19)
    full = create_model("espnet")
    assert len(full.level2) == 2 and len(full.level3) == 8 and full.classifier.out_channels == 20


def test_padding_crops_back_exactly():
    """Padding to a multiple of 8 is zero padding of the input: a size already a multiple of 8 is
    unpadded, and the output of an odd size is the top-left crop of the padded input's output."""
    torch.manual_seed(2)
    model = create_model("espnet", num_classes=5, alpha2=1, alpha3=1).eval()
    x = torch.randn(1, 3, 21, 27)
    with torch.no_grad():
        out = model(x)["out"]
        padded = model(F.pad(x, (0, 5, 0, 3)))["out"]
    torch.testing.assert_close(out, padded[:, :, :21, :27])


# ---------------------------------------------------------------------------------------------- fused == reference

@pytest.mark.parametrize("name", VARIANTS)
def test_fused_matches_reference_backend(name):
    torch.manual_seed(3)
    model = create_model(name, num_classes=6)
    x = torch.randn(1, 3, 45, 67)
    _calibrate_bn(model, torch.randn(2, *x.shape[1:]))
    with torch.no_grad():
        fused = model(x)["out"]
        with ops.use_backend("reference"):
            ref = model(x)["out"]
    rel = ((fused - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"relative error {rel:.3g}"


# ---------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(4)
    model = create_model(name, num_classes=5, alpha2=1, alpha3=2).train()
    out = model(torch.randn(2, 3, 33, 41))["out"]
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_training_step_fused_matches_reference_backend():
    """One train-mode forward + backward: the parameter gradients of the fused and reference backends agree."""
    torch.manual_seed(5)
    model = create_model("espnet", num_classes=5, alpha2=1, alpha3=2).train()
    x, target = torch.randn(2, 3, 24, 32), torch.randint(0, 5, (2, 24, 32))
    grads = []
    for backend in (None, "reference"):
        model.zero_grad()
        with ops.use_backend(backend):
            F.cross_entropy(model(x)["out"], target).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for (name, _), g, r in zip(model.named_parameters(), *grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------- torch.compile

def test_compile_fullgraph_espnet():
    # aot_eager: dynamo capture without graph breaks + the fused op's fake kernel and autograd; inductor's
    # C++ codegen adds minutes on this machine and nothing to what is checked here.
    torch.manual_seed(6)
    model = create_model("espnet", num_classes=5, alpha2=1, alpha3=1)
    _calibrate_bn(model, torch.randn(2, 3, 24, 32))
    x = torch.randn(1, 3, 21, 35)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out, ref = compiled(x)["out"], model(x)["out"]
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


# ---------------------------------------------------------------------------------------------- overfit

def test_overfit_synthetic_shapes():
    # The full ESPNet (0.36 M parameters) memorises 4 images of discs and rectangles.
    miou = overfit_miou(lambda: create_model("espnet", num_classes=5), steps=120, lr=1e-2)
    assert miou >= 0.9, f"mIoU {miou:.3f}"


# ---------------------------------------------------------------------------------------------- ESP module

def _esp_eager(m: ESPModule, x: torch.Tensor) -> torch.Tensor:
    """The authors' module written out: reduce, five convs, sums, concat, residual, BN, PReLU."""
    r = m.reduce(x)
    y = _reference.esp_pyramid(r, list(m.branches), dilations=m.dilations)
    if m.residual:
        y = y + x
    return m.act(m.bn(y))


@pytest.mark.parametrize("n_in,n_out,stride,add,residual", [
    (64, 64, 1, True, True),
    (19, 64, 2, True, False),  # strided: never residual
    (40, 20, 1, False, False),  # the decoder's module
    (13, 13, 1, True, True),  # 13 = 5 + 4·2: the first branch takes the remainder
    (7, 11, 1, True, False),  # widths differ: no residual
])
def test_esp_module(n_in, n_out, stride, add, residual):
    torch.manual_seed(8)
    m = ESPModule(n_in, n_out, stride=stride, add=add).train()
    n = n_out // 5
    assert [tuple(b.shape) for b in m.branches] == [(n_out - 4 * n, n, 3, 3)] + [(n, n, 3, 3)] * 4
    assert m.residual == residual and m.bn.eps == 1e-3 and isinstance(m.act, nn.PReLU)
    assert m.reduce.kernel_size == ((3, 3) if stride == 2 else (1, 1)) and m.reduce.stride == (stride, stride)
    x = torch.randn(2, n_in, 15, 22)
    out = m(x)
    assert out.shape == (2, n_out, 15 // stride + 15 % stride, 22 // stride)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), _esp_eager(m, x), rtol=1e-4, atol=1e-5)


def test_esp_module_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        ESPModule(8, 8, stride=3)
    with pytest.raises(ValueError, match="n_out"):
        ESPModule(8, 4)


# ---------------------------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("kw,match", [
    ({"variant": "d"}, "variant"),
    ({"alpha2": -1}, "alpha2"),
    ({"alpha3": 1.5}, "alpha3"),
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 3}, "num_classes >= 5"),  # the decoder's ESP module needs one channel a branch
    ({"in_channels": 0}, "in_channels"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ESPNet(**kw)


def test_bad_input():
    model = create_model("espnet_a", alpha2=0, alpha3=0)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(3, 16, 16))
