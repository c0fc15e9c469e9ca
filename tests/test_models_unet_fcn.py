"""U-Net and FCN-32s/16s/8s: parameter counts against the papers, shapes at odd sizes, the valid
U-Net's size rule, overlap-tile prediction, FCN's fixed bilinear upsampling and crops, VGG-16
checkpoint compatibility, reference-backend agreement, gradients, and a short overfit run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

import fastseg
from fastseg.models import create_model
from fastseg.models.backbones.vgg import VGG16
from fastseg.models.fcn import FCN, BilinearDeconv2d, bilinear_kernel
from fastseg.models.unet import (
    _mirror_index,
    overlap_tile_predict,
    unet,
    valid_input_sizes,
    valid_output_size,
)

SMALL_VGG = {"widths": (4, 4, 8, 8, 8), "fc_channels": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mirror(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    x = x.index_select(-2, _mirror_index(x.shape[-2], top, bottom, x.device))
    return x.index_select(-1, _mirror_index(x.shape[-1], left, right, x.device))


# ----------------------------------------------------------------------------- parameter counts


def test_unet_parameter_count_matches_paper():
    with torch.device("meta"):
        model = create_model("unet", num_classes=2)  # paper: 1 input channel, valid padding
    assert _count(model) == 31_030_658
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 23  # "In total the network has 23 convolutional layers."
    assert [blk[0].out_channels for blk in model.encoder] == [64, 128, 256, 512, 1024]
    assert all(m.padding == (0, 0) for m in convs)
    with torch.device("meta"):
        same = unet(padding="same")
    assert _count(same) == 31_030_658  # padding changes no parameter


# Known figures: the paper's Table 1 gives 134M for FCN-VGG16; with 21 classes and the
# deconvolutions fixed (Caffe lr_mult 0) the FCN-8s count is 134,362,751 (as public ports list it).
FCN_COUNTS = {"fcn32s": (134_346_581, 1_806_336), "fcn16s": (134_357_354, 458_640), "fcn8s": (134_362_751, 127_008)}


@pytest.mark.parametrize("name", sorted(FCN_COUNTS))
def test_fcn_parameter_counts(name):
    fixed, deconv = FCN_COUNTS[name]
    with torch.device("meta"):
        model = create_model(name, num_classes=21)
        learn = create_model(name, num_classes=21, learnable_upsampling=True)
    assert _count(model) == fixed
    assert _count(learn) == fixed + deconv  # full 21×21×k×k Caffe blobs
    vgg = 14_714_688  # torchvision vgg16().features
    fc = 512 * 7 * 7 * 4096 + 4096 + 4096 * 4096 + 4096
    assert _count(model.backbone) == vgg and _count(model.fc6) + _count(model.fc7) == fc


# ----------------------------------------------------------------------------- U-Net shapes / size rule


@pytest.mark.parametrize("training", [False, True])
def test_unet_valid_572_to_388(training):
    torch.manual_seed(0)
    model = unet(num_classes=2, base_channels=2).train(training)
    out = model(torch.randn(1, 1, 572, 572))["out"]
    assert out.shape == (1, 2, 388, 388)


def test_unet_valid_size_rule():
    assert valid_output_size(572) == 388 and valid_output_size(188) == 4 and valid_output_size(204) == 20
    assert valid_input_sizes(500) == (492, 508) and valid_input_sizes(572) == (572, 572)
    assert valid_input_sizes(5) == (None, 188)
    torch.manual_seed(0)
    model = unet(num_classes=3, in_channels=2, base_channels=2).eval()
    out = model(torch.randn(2, 2, 188, 204))["out"]  # non-square: each axis on its own
    assert out.shape == (2, 3, 4, 20)
    with pytest.raises(ValueError, match=r"x: height 190 .*nearest valid sizes: 188 or 204"):
        model(torch.randn(1, 2, 190, 204))
    with pytest.raises(ValueError, match=r"x: width 100 .*nearest valid sizes: 188"):
        model(torch.randn(1, 2, 188, 100))
    with pytest.raises(ValueError, match=r"size 573 .* 572 or 588"):
        valid_output_size(573)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 65, 81), (2, 3, 97, 129), (2, 3, 17, 2)])
@pytest.mark.parametrize("training", [False, True])
def test_unet_same_any_size(shape, batch_norm, training):
    torch.manual_seed(0)
    model = create_model("unet", num_classes=5, in_channels=3, padding="same", batch_norm=batch_norm,
                         base_channels=2).train(training)
    out = model(torch.randn(shape))["out"]
    assert out.shape == (shape[0], 5, *shape[2:])


# ----------------------------------------------------------------------------- FCN shapes / crops


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
@pytest.mark.parametrize("shape", [(1, 3, 65, 81), (2, 3, 97, 129), (1, 3, 1, 1), (1, 3, 7, 251)])
@pytest.mark.parametrize("training", [False, True])
def test_fcn_output_is_input_size(name, shape, training):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **SMALL_VGG).train(training)
    out = model(torch.randn(shape))["out"]
    assert out.shape == (shape[0], 5, *shape[2:])


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_fcn_full_width_any_size_meta(name):
    # Shape arithmetic of the real nets (pad 100, ceil pooling, crops 5/9 and 19/27/31) on the meta device.
    with torch.device("meta"):
        model = create_model(name, num_classes=21).eval()
        for h, w in [(1, 1), (2, 3), (31, 32), (33, 63), (64, 65), (97, 129), (191, 224), (500, 375), (513, 1023)]:
            assert model(torch.empty(1, 3, h, w))["out"].shape == (1, 21, h, w), (h, w)


def test_fcn8s_full_width_forward():
    torch.manual_seed(0)
    model = create_model("fcn8s", num_classes=21).eval()
    with torch.no_grad():
        for m in (model.score_fr, model.score_pool4, model.score_pool3):
            m.weight.normal_(0, 0.01)
        out = model(torch.randn(1, 3, 65, 81))["out"]
    assert out.shape == (1, 21, 65, 81) and torch.isfinite(out).all()


def test_fcn_score_layers_zero_initialised():
    torch.manual_seed(0)
    model = create_model("fcn8s", num_classes=4, **SMALL_VGG).eval()
    for m in (model.score_fr, model.score_pool4, model.score_pool3):
        assert not m.weight.any() and not m.bias.any()
    assert not model(torch.randn(1, 3, 33, 40))["out"].any()


def test_fcn_matches_caffe_structure():
    model = create_model("fcn8s", num_classes=21, **SMALL_VGG)
    with torch.device("meta"):
        fcn16s, fcn32s = create_model("fcn16s"), create_model("fcn32s")
    assert model.backbone.features[0].padding == (100, 100)
    assert all(m.ceil_mode for m in model.backbone.features if isinstance(m, nn.MaxPool2d))
    assert model.fc6.kernel_size == (7, 7) and model.fc7.kernel_size == (1, 1)
    assert model.drop6.p == model.drop7.p == 0.5
    ups = {n: (m.kernel_size, m.stride) for n, m in model.named_modules() if isinstance(m, BilinearDeconv2d)}
    assert ups == {"upscore2": (4, 2), "upscore_pool4": (4, 2), "upscore8": (16, 8)}
    assert {n: (m.kernel_size, m.stride) for n, m in fcn16s.named_modules()
            if isinstance(m, BilinearDeconv2d)} == {"upscore2": (4, 2), "upscore16": (32, 16)}
    assert {n: (m.kernel_size, m.stride) for n, m in fcn32s.named_modules()
            if isinstance(m, BilinearDeconv2d)} == {"upscore": (64, 32)}


# ----------------------------------------------------------------------------- bilinear deconvolutions


def test_bilinear_kernel_values():
    one_d4 = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=torch.float64)
    assert torch.equal(bilinear_kernel(4, dtype=torch.float64), torch.outer(one_d4, one_d4))
    k16 = bilinear_kernel(16, dtype=torch.float64)
    one_d = 1 - (torch.arange(16, dtype=torch.float64) - 7.5).abs() / 8
    torch.testing.assert_close(k16, torch.outer(one_d, one_d), rtol=0, atol=1e-15)
    assert bilinear_kernel(3)[1, 1] == 1 and bilinear_kernel(3)[0, 1] == 0.5  # odd size: centre on a pixel


@pytest.mark.parametrize("k,s", [(4, 2), (16, 8), (32, 16), (64, 32)])
def test_bilinear_deconv_interpolates(k, s):
    # In the interior each output pixel gets exactly two taps per axis whose weights sum to 1, and a
    # linear ramp comes out linear: the fixed deconvolution is bilinear interpolation by s.
    up = BilinearDeconv2d(2, k, s).double()
    ramp = torch.arange(6, dtype=torch.float64)
    x = torch.stack([torch.ones(6, 6, dtype=torch.float64), ramp[:, None] + 2 * ramp[None, :]])[None]
    y = up(x)[0]
    inner = slice(k, y.shape[-1] - k)
    torch.testing.assert_close(y[0, inner, inner], torch.ones_like(y[0, inner, inner]))
    r = y[1, inner, inner]
    torch.testing.assert_close(r[1:, :] - r[:-1, :], torch.full_like(r[1:, :], 1 / s))
    torch.testing.assert_close(r[:, 1:] - r[:, :-1], torch.full_like(r[:, 1:], 2 / s))


def test_fcn_upsampling_fixed_by_default_and_learnable_on_request():
    torch.manual_seed(0)
    model = create_model("fcn8s", num_classes=3, **SMALL_VGG)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith(("upscore", "upscore2", "upscore8")) for n in names)
    before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, BilinearDeconv2d)}
    assert all(not m.weight.requires_grad for m in model.modules() if isinstance(m, BilinearDeconv2d))
    with torch.no_grad():
        model.score_fr.weight.normal_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(1, 3, 40, 41))["out"].square().mean().backward()
    opt.step()
    for n, m in model.named_modules():
        if isinstance(m, BilinearDeconv2d):
            assert torch.equal(m.weight, before[n])
            torch.testing.assert_close(m.weight[1, 0], bilinear_kernel(m.kernel_size))
    assert not any(k.startswith("upscore") for k in model.state_dict())  # a function of (C, k), not stored

    learn = create_model("fcn8s", num_classes=3, learnable_upsampling=True, **SMALL_VGG).eval()
    missing = learn.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["upscore2.weight", "upscore8.weight", "upscore_pool4.weight"]
    assert learn.upscore8.weight.requires_grad and learn.upscore8.weight.shape == (3, 3, 16, 16)
    assert not learn.upscore8.weight[0, 1].any()  # Caffe's init: bilinear on the diagonal only
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(learn(x)["out"], model.eval()(x)["out"], rtol=1e-5, atol=1e-6)


def test_fcn_at_once_scales_skips():
    torch.manual_seed(0)
    staged = create_model("fcn8s", num_classes=3, **SMALL_VGG).eval()
    at_once = create_model("fcn8s", num_classes=3, at_once=True, **SMALL_VGG).eval()
    with torch.no_grad():
        for n in ("score_fr", "score_pool4", "score_pool3"):
            getattr(staged, n).weight.normal_()
            getattr(staged, n).bias.normal_()
        at_once.load_state_dict(staged.state_dict())
        staged.score_pool4.weight.mul_(0.01)
        staged.score_pool3.weight.mul_(0.0001)
        x = torch.randn(1, 3, 45, 38)
        torch.testing.assert_close(at_once(x)["out"], staged(x)["out"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- VGG-16 checkpoints


def test_vgg16_state_dict_names_match_torchvision():
    with torch.device("meta"):
        tv = torchvision.models.vgg16().features.state_dict()
        ours = VGG16().state_dict()
        fcn = create_model("fcn32s").backbone.state_dict()
    shapes = {k: tuple(v.shape) for k, v in tv.items()}
    assert {f"features.{k}": s for k, s in shapes.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in fcn.items()}


def test_vgg16_loads_torchvision_checkpoint(tmp_path):
    torch.manual_seed(0)
    tv = make_layers(cfgs["D"])  # torchvision's VGG-16 features
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in tv.state_dict().items()}, path)
    ours = VGG16(weights=path, out_features=("pool5",)).eval()
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["pool5"], tv.eval()(x), rtol=0, atol=0)
    gray = VGG16(1, weights=path, out_features=("conv1_1",))  # RGB filters folded over one channel
    torch.testing.assert_close(gray.features[0].weight, tv[0].weight.sum(1, keepdim=True))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="backbone_weights"):
        VGG16(weights=tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="backbone_weights: no such file"):
        VGG16(weights=tmp_path / "missing.pth")


def test_fcn_backbone_weights_convolutionalise_classifier(tmp_path):
    torch.manual_seed(0)
    donor = FCN(5, stride=8, **SMALL_VGG)
    c5, fc = SMALL_VGG["widths"][-1], SMALL_VGG["fc_channels"]
    state = {f"features.{k[len('backbone.features.'):]}": v for k, v in donor.state_dict().items()
             if k.startswith("backbone.")}
    state |= {"classifier.0.weight": torch.randn(fc, c5 * 49), "classifier.0.bias": torch.randn(fc),
              "classifier.3.weight": torch.randn(fc, fc), "classifier.3.bias": torch.randn(fc),
              "classifier.6.weight": torch.randn(1000, fc), "classifier.6.bias": torch.randn(1000)}
    torch.save({"state_dict": state}, tmp_path / "vgg.pth")
    model = create_model("fcn8s", num_classes=5, backbone_weights=tmp_path / "vgg.pth", **SMALL_VGG)
    assert torch.equal(model.backbone.features[28].weight, donor.backbone.features[28].weight)
    assert torch.equal(model.fc6.weight, state["classifier.0.weight"].view(fc, c5, 7, 7))
    assert torch.equal(model.fc7.weight[..., 0, 0], state["classifier.3.weight"])
    assert torch.equal(model.fc6.bias, state["classifier.0.bias"])
    state["classifier.0.weight"] = torch.randn(fc, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="classifier.0"):
        create_model("fcn8s", num_classes=5, backbone_weights=tmp_path / "bad.pth", **SMALL_VGG)


# ----------------------------------------------------------------------------- backends, gradients


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", ["unet_valid", "unet_same_bn", "fcn32s", "fcn16s", "fcn8s"])
def test_fused_matches_reference_backend(case):
    torch.manual_seed(0)
    if case == "unet_valid":
        model, x = unet(num_classes=3, base_channels=2), torch.randn(2, 1, 188, 204)
    elif case == "unet_same_bn":
        model, x = unet(num_classes=3, in_channels=3, padding="same", batch_norm=True, base_channels=2), \
            torch.randn(1, 3, 65, 81)
        model.train()(x)  # non-trivial running statistics
    else:
        model, x = create_model(case, num_classes=4, **SMALL_VGG), torch.randn(1, 3, 65, 81)
        with torch.no_grad():
            for n in ("score_fr", "score_pool4", "score_pool3"):
                if hasattr(model, n):
                    getattr(model, n).weight.normal_(0, 0.5)
    model.eval()
    with torch.no_grad():
        fused = model(x)["out"]
        with fastseg.ops.use_backend("reference"):
            ref32 = model(x)["out"]
            ref64 = model.double()(x.double())["out"]
    assert fused.dtype == torch.float32 and ref64.abs().max() > 0
    assert _rel_err(fused, ref64) < 1e-4
    assert _rel_err(ref32, ref64) < 1e-4


@pytest.mark.parametrize("case", ["unet_valid", "unet_same_bn", "fcn8s", "fcn16s", "fcn32s"])
def test_gradients_reach_every_parameter(case):
    torch.manual_seed(0)
    if case == "unet_valid":
        model, x = unet(num_classes=2, base_channels=2, dropout=0.0), torch.randn(2, 1, 188, 188)
    elif case == "unet_same_bn":
        model, x = unet(num_classes=3, in_channels=3, padding="same", batch_norm=True, base_channels=2), \
            torch.randn(2, 3, 33, 47)
    else:
        model = create_model(case, num_classes=3, learnable_upsampling=True, dropout=0.0, **SMALL_VGG)
        x = torch.randn(2, 3, 41, 37)
        with torch.no_grad():  # zero-initialised score layers would block the gradient to the backbone
            for n in ("score_fr", "score_pool4", "score_pool3"):
                if hasattr(model, n):
                    getattr(model, n).weight.normal_(0, 0.5)
    model.train()
    out = model(x)["out"]
    target = torch.randint(0, out.shape[1], (out.shape[0], *out.shape[2:]))
    F.cross_entropy(out, target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


# ----------------------------------------------------------------------------- overlap-tile


def test_overlap_tile_valid_equals_direct_forward():
    torch.manual_seed(0)
    model = unet(num_classes=2, in_channels=2, base_channels=2).double().eval()
    image = torch.randn(2, 2, 220, 204, dtype=torch.float64)  # valid sizes: a direct forward gives the centre 36 x 20
    out = overlap_tile_predict(model, image, tile=332)  # 2 x 2 tiles, steps of 144
    assert out.shape == (2, 2, 220, 204)
    with torch.no_grad():
        direct = model(image)["out"]
        torch.testing.assert_close(out[..., 92:-92, 92:-92], direct, rtol=1e-9, atol=1e-10)
        # ... and everywhere: one forward over the image mirrored by 96 px (412 x 396, both valid),
        # whose output starts 4 px before the image
        full = model(_mirror(image, 96, 96, 96, 96))["out"][..., 4:4 + 220, 4:4 + 204]
    torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-10)


def test_overlap_tile_same_equals_direct_forward():
    torch.manual_seed(0)
    model = unet(num_classes=3, padding="same", batch_norm=True, base_channels=2)
    model.train()(torch.randn(2, 1, 64, 64))  # non-trivial BatchNorm statistics
    model.double().eval()
    image = torch.randn(1, 260, 250, dtype=torch.float64)  # [C, H, W]
    out = overlap_tile_predict(model, image, tile=384)  # 2 x 2 tiles
    assert out.shape == (3, 260, 250)
    with torch.no_grad():
        direct = model(image[None])["out"][0]
        c = model.context  # pixels of a direct forward unaffected by its zero padding
        torch.testing.assert_close(out[:, c:-c, c:-c], direct[:, c:-c, c:-c], rtol=1e-9, atol=1e-10)
        full = model(_mirror(image[None], c, c, c, c))["out"][0, :, c:-c, c:-c]
    torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_overlap_tile_small_and_odd_images(padding):
    torch.manual_seed(0)
    model = unet(num_classes=2, padding=padding, base_channels=2).eval()
    for h, w in [(1, 1), (5, 3), (29, 17)]:
        out = overlap_tile_predict(model, torch.randn(1, 1, h, w))
        assert out.shape == (1, 2, h, w) and torch.isfinite(out).all()


def test_overlap_tile_bad_arguments():
    model = unet(base_channels=2).eval()
    with pytest.raises(ValueError, match="tile"):
        overlap_tile_predict(model, torch.randn(1, 1, 30, 30), tile=500)
    with pytest.raises(ValueError, match="tile"):
        overlap_tile_predict(model, torch.randn(1, 1, 30, 30), tile=188)  # no room for a 16 px step
    with pytest.raises(ValueError, match="tile"):
        overlap_tile_predict(unet(padding="same", base_channels=2), torch.randn(1, 1, 30, 30), tile=200)
    with pytest.raises(ValueError, match="image"):
        overlap_tile_predict(model, torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="model"):
        overlap_tile_predict(nn.Identity(), torch.randn(1, 1, 30, 30))


# ----------------------------------------------------------------------------- bad arguments


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="padding"):
        unet(padding="reflect")
    with pytest.raises(ValueError, match="base_channels"):
        unet(base_channels=0)
    with pytest.raises(ValueError, match="in_channels"):
        unet(in_channels=0)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("fcn8s", num_classes=0)
    with pytest.raises(ValueError, match="stride"):
        FCN(21, stride=4)
    with pytest.raises(ValueError, match="at_once"):
        create_model("fcn32s", at_once=True, **SMALL_VGG)
    with pytest.raises(ValueError, match="widths"):
        create_model("fcn8s", widths=(4, 4))
    model = unet(padding="same", base_channels=2)
    with pytest.raises(ValueError, match=r"x must be \[N, 1, H, W\]"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"x must be \[N, 3, H, W\]"):
        create_model("fcn8s", **SMALL_VGG)(torch.randn(3, 32, 32))


# ----------------------------------------------------------------------------- overfit


def _synthetic_shapes(n: int, h: int, w: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images of a disc (class 1) and a rectangle (class 2) on background (class 0)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        lab = torch.zeros(h, w, dtype=torch.long)
        cy, cx = (torch.randint(10, s - 10, (1,), generator=g).item() for s in (h, w))
        r = torch.randint(5, 10, (1,), generator=g).item()
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        y0, x0 = torch.randint(0, h - 12, (1,), generator=g).item(), torch.randint(0, w - 14, (1,), generator=g).item()
        lab[y0:y0 + 10, x0:x0 + 12] = 2
        img = (lab == 1).float() + 0.5 * (lab == 2).float() + 0.3 * torch.randn(h, w, generator=g)
        images.append(img[None])
        labels.append(lab)
    return torch.stack(images), torch.stack(labels)


def test_unet_overfits_synthetic_shapes():
    torch.manual_seed(0)
    x, y = _synthetic_shapes(4, 45, 53, torch.Generator().manual_seed(0))  # odd sizes: same mode pads inside
    model = unet(num_classes=3, padding="same", batch_norm=True, base_channels=8, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    miou = 0.0
    for step in range(300):
        model.train()
        loss = F.cross_entropy(model(x)["out"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            model.eval()
            with torch.no_grad():
                pred = model(x)["out"].argmax(1)
            miou = sum(((pred == c) & (y == c)).sum().item() / ((pred == c) | (y == c)).sum().clamp_min(1).item()
                       for c in range(3)) / 3
            if miou >= 0.95:
                break
    assert miou >= 0.9, f"mIoU {miou:.3f} after {step + 1} steps"
