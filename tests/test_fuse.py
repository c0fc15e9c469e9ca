"""fastseg.nn.fuse_modules: separable-conv chains and DANet attention swapped into third-party and
user models (smp DeepLabV3Plus, timm Xception, hand-written blocks); eval outputs equal, train mode
unchanged (outputs, gradients, running statistics), Parameters shared, unfusable chains reported."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastseg.nn.conv as conv_module
from fastseg.nn import ChannelAttention, PositionAttention, SeparableConv2d, fuse_modules

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Non-trivial running statistics: a few train-mode forwards."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x + 0.3 * torch.randn_like(x))
    model.eval()


def _fused_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = conv_module.separable_conv2d

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_module, "separable_conv2d", spy)
    return calls


def _assert_close(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() if scale is None else scale
    assert err <= 1e-4 * scale + 1e-6, f"max error {err:.3g} (scale {scale:.3g})"


def _train_step_matches(model: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """One train-mode forward/backward: same outputs, gradients and running statistics (the same seed
    before each forward: smp's ASPP has dropout)."""
    model.train()
    fused.train()
    torch.manual_seed(123)
    out = model(x)
    torch.manual_seed(123)
    out_f = fused(x)
    _assert_close(out_f, out)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(model.parameters()), g)
    grads_f = torch.autograd.grad(out_f, list(fused.parameters()), g)
    scale = max(g.abs().max().item() for g in grads)  # (a conv bias before a BatchNorm gets ~0)
    for a, b in zip(grads_f, grads, strict=True):  # deepcopy keeps parameter order
        _assert_close(a, b, scale)
    for (n, a), (_, b) in zip(fused.named_buffers(), model.named_buffers(), strict=False):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), n


# ----------------------------------------------------------------------------------------------- smp

def test_smp_deeplabv3plus_separable_aspp_and_decoder(monkeypatch):
    smp = pytest.importorskip("segmentation_models_pytorch", reason="smp is a dev dependency (not on the GPU machine)")
    torch.manual_seed(0)
    model = smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, classes=5)
    x = torch.randn(2, 3, 64, 64)
    _calibrate(model, x)
    fused, report = fuse_modules(model)
    # the three separable ASPP branches, the separable conv after the ASPP projection, the decoder's
    names = {r.name for r in report.fused}
    assert {"decoder.aspp.0.convs.1.0", "decoder.aspp.0.convs.2.0", "decoder.aspp.0.convs.3.0",
            "decoder.block2.0"} <= names, report
    assert all(r.kind == "separable_conv2d" for r in report.fused) and not report.skipped
    assert sum(isinstance(m, SeparableConv2d) for m in fused.modules()) == len(report.fused)
    assert not any(isinstance(m, SeparableConv2d) for m in model.modules()), "inplace=False must not touch it"
    calls = _fused_calls(monkeypatch)
    with torch.no_grad():
        _assert_close(fused(x), model(x))
    assert len(calls) == len(report.fused)
    _train_step_matches(model, fused, torch.randn(2, 3, 32, 32))


# ----------------------------------------------------------------------------------------------- timm

def test_timm_aligned_xception_blocks(monkeypatch):
    timm = pytest.importorskip("timm", reason="timm provides the Xception blocks swapped here")
    torch.manual_seed(1)
    model = timm.create_model("xception41", pretrained=False, num_classes=7)
    x = torch.randn(2, 3, 48, 48)
    _calibrate(model, x)
    fused, report = fuse_modules(model)
    n_sep = sum(type(m).__name__ == "SeparableConv2d" and m.__module__.startswith("timm") for m in model.modules())
    assert len(report.fused) == n_sep == 39, report  # every one of timm's SeparableConv2d blocks
    assert not any(m.__module__.startswith("timm") and type(m).__name__ == "SeparableConv2d" for m in fused.modules())
    # stride-2 blocks and the ones whose ReLU sits in the enclosing stack are covered too
    assert any("s=2" in r.detail for r in report.fused)
    assert any(r.replaced[-1].endswith("act2") for r in report.fused)
    calls = _fused_calls(monkeypatch)
    with torch.no_grad():
        _assert_close(fused(x), model(x))
    assert len(calls) == 39


def test_timm_separable_conv_norm_act_uses_batchnormact():
    layers = pytest.importorskip("timm.layers", reason="timm provides SeparableConvNormAct")
    torch.manual_seed(2)
    block = layers.SeparableConvNormAct(12, 20, kernel_size=3, dilation=2, apply_act=True)
    x = torch.randn(2, 12, 11, 13)
    _calibrate(block, x)
    fused, report = fuse_modules(block)
    assert [r.kind for r in report.fused] == ["separable_conv2d"] and "pw[bn+relu]" in report.fused[0].detail
    with torch.no_grad():
        _assert_close(fused(x), block(x))
    _train_step_matches(block, fused, x)


# ----------------------------------------------------------------------------------------------- user blocks

class AttrBlock(nn.Module):
    """A user's separable block as attributes, functional ReLUs, a conv bias on both stages."""

    def __init__(self, cin: int, cout: int, dilation: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, dilation, dilation, groups=cin)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn2(self.pw(F.relu(self.bn1(self.dw(x))))))


class SharedReluBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw, self.act, self.pw = nn.Conv2d(c, c, 5, padding=2, groups=c, bias=False), nn.ReLU(), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.act(self.pw(self.act(self.dw(x))))


@pytest.mark.parametrize("training", [False, True])
def test_user_blocks_in_a_sequential_and_as_attributes(training):
    torch.manual_seed(3)
    model = nn.Sequential(
        AttrBlock(5, 7, dilation=3),
        AttrBlock(7, 6, stride=2),
        SharedReluBlock(6),
        nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),  # in line
        nn.Identity(), nn.Conv2d(6, 3, 1), nn.BatchNorm2d(3),
        nn.Conv2d(3, 3, 3, padding=0, groups=3), nn.Conv2d(3, 2, 1),  # valid padding: not DeepLab's "same"
    )
    x = torch.randn(2, 5, 17, 23)
    _calibrate(model, x)
    model.train(training)
    fused, report = fuse_modules(model)
    assert [r.name for r in report.fused] == ["0", "1", "2", "3"], report
    assert isinstance(fused[2], SeparableConv2d)  # shared ReLU + functional use: rebuilt, then fused whole
    assert [type(fused[i]).__name__ for i in range(4, 9)] == ["Identity"] * 5  # indices stay where they were
    assert report.skipped == [("9", "padding (0, 0) is not DeepLab's 'same' padding (1, 1)")]
    assert fused.training == training and all(m.training == training for m in fused.modules())
    if training:
        _train_step_matches(model, fused, x)
    else:
        with torch.no_grad():
            _assert_close(fused(x), model(x))


def test_inplace_shares_parameters_with_an_existing_optimizer():
    torch.manual_seed(4)
    model = nn.Sequential(AttrBlock(4, 8), nn.Conv2d(8, 2, 1))
    ids = {id(p) for p in model.parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fused, report = fuse_modules(model, inplace=True)
    assert fused is model and len(report.fused) == 1
    assert {id(p) for p in fused.parameters()} == ids
    before = fused[0].depthwise.weight.detach().clone()
    fused(torch.randn(2, 4, 9, 9)).sum().backward()
    opt.step()
    assert not torch.equal(fused[0].depthwise.weight, before)


def test_a_block_that_is_the_whole_model_and_non_chains_left_alone():
    torch.manual_seed(5)
    block = AttrBlock(3, 4).eval()
    fused, report = fuse_modules(block)
    assert isinstance(fused, SeparableConv2d) and len(report.fused) == 1
    assert report.fused[0].replaced == ["dw", "bn1", "pw", "bn2"]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        _assert_close(fused(x), block(x))

    class Residual(nn.Module):  # the depthwise output is used twice: not a chain
        def __init__(self):
            super().__init__()
            self.dw, self.pw = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.dw(x)
            return self.pw(y) + y

    fused, report = fuse_modules(Residual())
    assert not report.fused and not isinstance(fused.dw, SeparableConv2d)
    with pytest.raises(TypeError, match="model"):
        fuse_modules(lambda x: x)


def test_hooked_modules_are_kept():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6),
                          nn.ReLU()).eval()
    seen = []
    model[3].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    fused, report = fuse_modules(model)
    assert report.fused[0].replaced == ["0", "1", "2"] and type(fused[3]) is nn.ReLU
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        _assert_close(fused(x), model(x))
    assert len(seen) == 2


def test_report_string_lists_swaps():
    _, report = fuse_modules(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1)))
    assert "1 module(s) fused" in str(report) and "4->6 3x3 d=1 s=1" in str(report)


# ----------------------------------------------------------------------------------------------- attention

class DANetPAM(nn.Module):
    """The DANet paper's position attention written out in plain PyTorch (N×N map)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.query_conv, self.key_conv = nn.Conv2d(c, c // 8, 1), nn.Conv2d(c, c // 8, 1)
        self.value_conv = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.query_conv(x).view(b, -1, h * w).permute(0, 2, 1)
        k = self.key_conv(x).view(b, -1, h * w)
        attn = self.softmax(torch.bmm(q, k))
        out = torch.bmm(self.value_conv(x).view(b, -1, h * w), attn.permute(0, 2, 1)).view(b, c, h, w)
        return self.gamma * out + x


class DANetCAM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.shape
        q = x.view(b, c, -1)
        energy = torch.bmm(q, q.permute(0, 2, 1))
        attn = self.softmax(energy.max(-1, keepdim=True)[0].expand_as(energy) - energy)
        return self.gamma * torch.bmm(attn, q).view(b, c, h, w) + x


class ScaledPAM(DANetPAM):  # same names, different function (1/sqrt(d) scaling): must stay
    def forward(self, x):
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2).transpose(1, 2)
        attn = self.softmax(q @ self.key_conv(x).flatten(2) / q.shape[-1] ** 0.5)
        return self.gamma * (self.value_conv(x).flatten(2) @ attn.transpose(1, 2)).view(b, c, h, w) + x


def test_danet_attention_modules_are_swapped_after_a_probe():
    torch.manual_seed(6)
    model = nn.ModuleDict({"pam": DANetPAM(32), "cam": DANetCAM(), "decoy": ScaledPAM(32)})
    for m in model.values():
        nn.init.normal_(m.gamma, 0, 1)
    fused, report = fuse_modules(model)
    assert sorted((r.name, r.kind) for r in report.fused) == [("cam", "channel_attention"),
                                                             ("pam", "position_attention")]
    assert isinstance(fused["pam"], PositionAttention) and isinstance(fused["cam"], ChannelAttention)
    assert isinstance(fused["decoy"], ScaledPAM)
    assert fused["pam"].gamma.item() == model["pam"].gamma.item()  # the probe restored gamma
    x = torch.randn(2, 32, 7, 9)
    with torch.no_grad():
        for k in ("pam", "cam"):
            _assert_close(fused[k](x), model[k](x))
    _, report = fuse_modules(model, attention=False)
    assert not report.fused


def test_fastseg_models_are_left_as_they_are():
    from fastseg.models import create_model

    model = create_model("deeplabv3plus", num_classes=3, width_multiplier=0.125)
    fused, report = fuse_modules(model)
    assert not report.fused, report  # already built from fastseg modules
    assert str(fused) == str(copy.deepcopy(model))
