"""DANet: parameter count, shapes at odd sizes, fused vs reference backend, gradients, the loss, and
the fused attention head's memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fastseg import ops
from fastseg.losses import danet_loss
from fastseg.models import create_model
from fastseg.models.danet import DANet
from fastseg.nn import DANetHead

TV_RESNET101 = 44_549_160  # torchvision resnet101 (docs: num_params), its 1000-class fc included
FC_1000 = 2048 * 1000 + 1000

pytestmark = pytest.mark.usefixtures("one_thread")


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _with_attention(model: nn.Module, gamma: float = 0.7) -> nn.Module:
    """The attention modules' gammas start at 0 (the paper's init), which hides PAM and CAM from
    the logits and their gradients; tests set them non-zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(gamma)
    return model


def _calibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics = the batch statistics of ``x``, so that eval numerics are realistic."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    for m in bns:
        m.momentum = 0.1
    model.eval()


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return _with_attention(create_model("danet", num_classes=5, backbone="resnet50"))


def test_param_count_r101():
    """DANet-R101, 19 classes = torchvision's ResNet-101 without its fc (42,500,160) + the head:
    conv5a/conv5c 3×3 2048→512 + BN (2 × 9,438,208), PAM's 1×1 convs 512→64, 512→64, 512→512 with
    bias + γ (328,321), CAM's β (1), conv51/conv52 3×3 512→512 + BN (2 × 2,360,320), three 1×1
    classifiers 512→19 with bias (3 × 9,747): 66,454,779 in all. (The authors' ResNet has a
    three-conv deep stem and a 128-wide layer1 input: 123,776 more.)"""
    model = create_model("danet")
    k, inter = 19, 512
    conv_bn = lambda cin, cout: cin * cout * 9 + 2 * cout  # noqa: E731
    head = (2 * conv_bn(2048, inter) + (2 * (inter * 64 + 64) + inter * inter + inter + 1) + 1
            + 2 * conv_bn(inter, inter) + 3 * (inter * k + k))
    assert _n(model.head) == head == 23_954_619
    assert _n(model.backbone) == TV_RESNET101 - FC_1000
    assert _n(model) == TV_RESNET101 - FC_1000 + head == 66_454_779


def test_paper_defaults():
    model = create_model("danet")
    assert isinstance(model, DANet) and model.output_stride == 8
    assert model.head.conv8[1].out_channels == 19
    # layer4's three blocks dilate 4, 8, 16 (multi-grid (1, 2, 4) on the stage's rate 4); layer3 at 2
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [4, 8, 16]
    assert {b.conv2.dilation[0] for b in model.backbone.layer3} == {2}
    assert len(model.backbone.layer3) == 23
    assert model.head.sa.query_conv.out_channels == 64  # PAM: keys of in/8 channels


@pytest.mark.parametrize("shape", [(1, 3, 33, 41), (2, 3, 47, 29), (1, 3, 8, 9)])
def test_shapes_train_and_eval(r50, shape):
    x = torch.randn(*shape)
    out = r50.train()(x)
    assert sorted(out) == ["cam", "out", "pam"]
    assert all(v.shape == (shape[0], 5, *shape[2:]) for v in out.values())
    with torch.no_grad():
        out = r50.eval()(x)
    assert list(out) == ["out"] and out["out"].shape == (shape[0], 5, *shape[2:])


def test_aux_outputs_in_eval_when_asked():
    torch.manual_seed(1)
    on = create_model("danet", num_classes=3, backbone="resnet50", aux_loss=True).eval()
    off = create_model("danet", num_classes=3, backbone="resnet50", aux_loss=False).train()
    x = torch.randn(1, 3, 25, 31)
    with torch.no_grad():
        out = on(x)
    assert sorted(out) == ["cam", "out", "pam"] and out["pam"].shape == (1, 3, 25, 31)
    assert list(off(x)) == ["out"]


def test_outputs_are_the_heads_upsampled(r50):
    """"out", "pam", "cam" are the head's fused / position / channel logits, corner-aligned upsampled."""
    x = torch.randn(1, 3, 33, 41)  # 8k + 1: no padding
    r50.eval()
    with torch.no_grad():
        fused, pam, cam = r50.head(r50.backbone(x)["layer4"])
        r50.aux_mode = True
        out = r50(x)
        r50.aux_mode = None
    for key, logits in (("out", fused), ("pam", pam), ("cam", cam)):
        up = F.interpolate(logits, size=(33, 41), mode="bilinear", align_corners=True)
        torch.testing.assert_close(out[key], up)


def test_fused_matches_reference_backend(r50):
    """Eval, float32: fused attention vs ``use_backend("reference")`` within 1e-4 relative (max-abs
    over the largest logit), all three outputs, attention switched on (γ = 0.7)."""
    torch.manual_seed(2)
    model = copy.deepcopy(r50)
    model.aux_mode = True
    _calibrate_bn(model, torch.randn(2, 3, 57, 49))
    x = torch.randn(2, 3, 57, 49)
    with torch.no_grad():
        fused = model(x)
        with ops.use_backend("reference"):
            ref = model(x)
    for key in ("out", "pam", "cam"):
        rel = ((fused[key] - ref[key]).abs().max() / ref[key].abs().max()).item()
        assert rel < 1e-4, f"{key}: relative error {rel:.3g}"
    # the attention is not a no-op: γ = 0 changes the logits
    with torch.no_grad():
        model.head.sa.gamma.zero_()
        assert (model(x)["pam"] - fused["pam"]).abs().max() > 1e-3


def test_gradients_reach_every_parameter(r50):
    torch.manual_seed(4)
    model = copy.deepcopy(r50).train()
    out = model(torch.randn(2, 3, 33, 41))
    sum((v * torch.randn_like(v)).sum() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_head_gradients_fused_match_reference():
    """The head's training step (PAM forward + backward fused) against the reference backend."""
    torch.manual_seed(5)
    head = _with_attention(DANetHead(64, 3)).train()
    x = torch.randn(2, 64, 13, 11)
    grads = []
    for backend in ("cpu", "reference"):
        head.zero_grad()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(6)  # the same dropout masks and output weights
        with ops.use_backend(backend):
            outs = head(xi)
        sum((o * torch.randn_like(o)).sum() for o in outs).backward()
        grads.append([xi.grad] + [p.grad for p in head.parameters()])
    for g, r in zip(*grads, strict=True):
        # relative to each tensor's scale; some are ~0 analytically (the key conv's bias)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * max(r.abs().max().item(), 1e-2))


def test_danet_loss_sums_three_equal_terms():
    torch.manual_seed(7)
    outs = {k: torch.randn(2, 4, 9, 11) for k in ("out", "pam", "cam")}
    target = torch.randint(0, 4, (2, 9, 11))
    target[0, 0, :3] = 255
    ce = [F.cross_entropy(outs[k], target, ignore_index=255) for k in ("out", "pam", "cam")]
    torch.testing.assert_close(danet_loss(outs, target), sum(ce))
    torch.testing.assert_close(danet_loss(outs, target, weights=(1, 0.5, 0.25)), ce[0] + 0.5 * ce[1] + 0.25 * ce[2])
    torch.testing.assert_close(danet_loss({"out": outs["out"]}, target), ce[0])  # eval: out only
    with pytest.raises(ValueError, match="weights"):
        danet_loss(outs, target, weights=(1, 1))
    with pytest.raises(ValueError, match="'out'"):
        danet_loss({"pam": outs["pam"]}, target)
    with pytest.raises(ValueError, match="pam"):
        danet_loss({**outs, "pam": torch.randn(3, 4, 9, 11)}, target)


def test_overfit_one_batch():
    """Eight Adam steps on one synthetic batch (two rectangles marked in the image) with danet_loss:
    the loss of the three heads together falls below a third."""
    torch.manual_seed(8)
    model = _with_attention(create_model("danet", num_classes=2, backbone="resnet50"), 0.1).train()
    target = torch.zeros(2, 33, 33, dtype=torch.long)
    target[0, 5:20, 8:30] = 1
    target[1, 12:, :17] = 1
    x = torch.randn(2, 3, 33, 33) * 0.5 + 2 * target[:, None].float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = danet_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses


def test_head_memory_stays_o_n_tile():
    """The fused head at N = 64² never allocates anything near the N×N energy (64 MiB): its largest
    allocation stays under 1/8 of it, while the reference head's is the N×N matrix itself."""
    torch.manual_seed(9)
    head = _with_attention(DANetHead(64, 3)).train()
    x = torch.randn(1, 64, 64, 64, requires_grad=True)
    n = 64 * 64

    def biggest(backend: str) -> int:
        with ops.use_backend(backend), torch.profiler.profile(profile_memory=True) as prof:
            sum(o.sum() for o in head(x)).backward()
        return max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)

    assert biggest("cpu") < n * n * 4 / 8
    assert biggest("reference") >= n * n * 4


@pytest.mark.parametrize("kw,arg", [({"backbone": "xception65"}, "backbone"), ({"output_stride": 32}, "output_stride"),
                                    ({"aux_loss": 1}, "aux_loss"), ({"multi_grid": (1, 2)}, "multi_grid"),
                                    ({"num_classes": 0}, "num_classes")])
def test_bad_arguments_raise_value_error(kw, arg):
    with pytest.raises(ValueError, match=arg):
        create_model("danet", **kw)


def test_bad_input_raises_value_error(r50):
    with pytest.raises(ValueError):
        r50(torch.randn(1, 4, 33, 33))


def test_benchmark_rows_exist():
    """The DANet model rows (512², 768²) and the PAM forward+backward rows against SDPA at N = 64², 96²."""
    from fastseg.bench import models as bench_models
    from fastseg.bench.cases import get_cases

    by_name = {c.name: c for c in get_cases("models")}
    assert [by_name[f"danet_{s}"].params["H"] for s in (512, 768)] == [512, 768]
    pam = {c.name: c for c in get_cases("position_attention")}
    for side in (512, 768):
        case = pam[f"danet_{side}_vs_sdpa_train"]
        assert case.mode == "fwd+bwd" and case.params["baseline"] == "_reference.position_attention_sdpa"
    assert bench_models.DANET_SIZES == (512, 768)
