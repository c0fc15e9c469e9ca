"""AUNet: the FPN pooler against torchvision's, PAM/MAM shapes and gradient flow (through roi_upsample),
panoptic fusion on hand-made cases, the eval output format, fused vs reference backends, and argument
checks. Reduced widths (resnet18, 32-channel FPN) and 64-px inputs throughout."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fastseg import ops
from fastseg.models import create_model, list_models
from fastseg.models.aunet import AUNet, _Attention, panoptic_fusion
from fastseg.nn import MultiScaleRoIAlign

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(backbone="resnet18", fpn_channels=32, stuff_channels=16, mask_layers=(16, 16), representation_size=64,
             norm_layer=nn.BatchNorm2d, min_size=64, max_size=64, anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
             stuff_min_area=16, rpn_post_nms_top_n_train=100, rpn_post_nms_top_n_test=50,
             box_batch_size_per_image=64, box_detections_per_img=10)


def small_model(seed: int = 0, **kw) -> AUNet:
    torch.manual_seed(seed)
    return create_model("aunet", num_classes=2, num_stuff_classes=3, **{**SMALL, **kw})


def scene(size: tuple[int, int] = (64, 64), seed: int = 0) -> tuple[torch.Tensor, dict]:
    """An image with two rectangles (things 1 and 2) over 3 stuff bands."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    img = torch.rand(3, h, w, generator=g)
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 5:25, 4:30] = 1
    masks[1, h // 2:h - 3, w // 2:w - 5] = 1
    boxes = torch.tensor([[4.0, 5.0, 30.0, 25.0], [w // 2, h // 2, w - 5, h - 3]], dtype=torch.float32)
    sem = torch.zeros(h, w, dtype=torch.long)
    sem[h // 3:] = 1
    sem[2 * h // 3:] = 2
    sem[0, :4] = 255
    return img, {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks, "semantic": sem}


def test_registry_and_arguments():
    assert "aunet" in list_models()
    with pytest.raises(ValueError, match="backbone"):
        create_model("aunet", num_classes=2, num_stuff_classes=2, backbone="vgg16")
    with pytest.raises(ValueError, match="num_stuff_classes"):
        create_model("aunet", num_classes=2, num_stuff_classes=0, backbone="resnet18")
    with pytest.raises(ValueError, match="targets"):
        small_model().train()([torch.rand(3, 64, 64)])
    # ResNet-50 + FPN at the paper's widths builds; its backbone is torchvision's, parameter for parameter
    model = create_model("aunet", num_classes=80, num_stuff_classes=53)
    tv = torchvision.models.resnet50(weights=None)
    body = model.backbone.body.state_dict()  # FrozenBatchNorm2d: weights and statistics are buffers
    assert {k: v.shape for k, v in tv.state_dict().items() if not k.startswith("fc.") and "num_batches" not in k} \
        == {k: v.shape for k, v in body.items()}
    assert model.classifier.out_channels == 54


def test_backbone_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    model = small_model(backbone_weights=str(path))
    torch.testing.assert_close(model.backbone.body.conv1.weight, tv.conv1.weight)
    assert not model.backbone.body.conv1.weight.requires_grad  # 3 trainable stages with loaded weights
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_multiscale_roi_align_matches_torchvision(sampling_ratio):
    torch.manual_seed(1)
    feats = {"0": torch.randn(2, 4, 32, 40), "1": torch.randn(2, 4, 16, 20), "2": torch.randn(2, 4, 8, 10),
             "3": torch.randn(2, 4, 4, 5)}
    xy = torch.rand(13, 2) * 100
    boxes = torch.cat([xy, xy + 4 + torch.rand(13, 2) * 120], 1)
    boxes = [boxes[:6], boxes[6:]]
    shapes = [(128, 160), (120, 150)]
    ours = MultiScaleRoIAlign(["0", "1", "2", "3"], (7, 5), sampling_ratio)
    theirs = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], (7, 5), sampling_ratio)
    want = theirs(feats, boxes, shapes)
    for backend in ops.available_backends()["roi_align"]:
        with ops.use_backend(backend):
            torch.testing.assert_close(ours(feats, boxes, shapes), want, atol=1e-5, rtol=1e-5)
    assert ours(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], shapes).shape == (0, 4, 7, 5)


def test_attention_module_shapes_and_update():
    """A = 1 - sigmoid(conv(G)); S <- S*A + S, then S <- S * sigmoid(W GAP(S)): checked against the
    formula with the module's own weights."""
    torch.manual_seed(2)
    att = _Attention(1, 6, 3)
    s, g = torch.randn(2, 6, 9, 11), torch.randn(2, 1, 9, 11)
    out = att(s, g)
    a = 1 - torch.sigmoid(att.conv(g))
    t = s * a + s
    want = t * torch.sigmoid(att.reweight(t.mean((2, 3), keepdim=True)))
    torch.testing.assert_close(out, want)
    assert out.shape == s.shape


def test_training_losses_and_gradient_flow_through_pam_and_mam():
    """The semantic loss alone reaches the RPN head's shared conv (PAM) and the mask head (MAM, through
    roi_upsample): non-zero gradients there. All losses are finite."""
    model = small_model().train()
    images, targets = zip(*(scene(seed=i) for i in range(2)), strict=True)
    losses = model(list(images), list(targets))
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask",
                           "loss_semantic"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_semantic"].backward()
    for name, p in (("MAM -> mask predictor", model.mask_predictor.mask_fcn_logits.weight),
                    ("MAM -> mask head", model.mask_head[0][0].weight),
                    ("PAM -> RPN shared conv", model.rpn.head.conv[0][0].weight),
                    ("MAM conv", model.mam[0].conv.weight), ("PAM conv", model.pam[3].conv.weight)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.roi_heads.box_predictor.cls_score.weight.grad is None  # no path from the semantic loss


def test_mam_input_is_roi_upsample_of_the_class_mask_logits(monkeypatch):
    """The MAM's guide on each level is fastseg.ops.roi_upsample(mode="aunet") of the RoIs' own-class
    mask logits at that level's scale."""
    import fastseg.nn.roi as mod

    calls = []
    real = mod.roi_upsample

    def spy(maps, rois, size, **kw):
        out = real(maps, rois, size, **kw)
        calls.append((maps.shape, rois.shape, size, kw["spatial_scale"], kw["mode"], out.shape))
        return out

    monkeypatch.setattr(mod, "roi_upsample", spy)
    model = small_model().train()
    images, targets = zip(*(scene(seed=i) for i in range(2)), strict=True)
    model(list(images), list(targets))
    assert [c[3] for c in calls] == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    for maps, rois, size, _, mode, out in calls:
        assert maps[1:] == (1, 28, 28) and rois[0] == maps[0] and mode == "aunet"
        assert out == (2, 1, *size)


def test_eval_output_format_and_panoptic_ids():
    model = small_model(box_score_thresh=0.0, panoptic_score_thresh=0.0, stuff_min_area=1).eval()
    images = [scene((64, 64))[0], scene((48, 80), seed=1)[0]]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, img in zip(out, images, strict=True):
        h, w = img.shape[-2:]
        k = len(o["boxes"])
        assert o["boxes"].shape == (k, 4) and o["labels"].shape == (k,) and o["scores"].shape == (k,)
        assert o["masks"].dtype == torch.bool and o["masks"].shape == (k, h, w)
        assert o["semantic"].shape == (h, w) and int(o["semantic"].max()) <= 3
        assert o["panoptic"].dtype == torch.int32 and o["panoptic"].shape == (h, w)
        ids = sorted(torch.unique(o["panoptic"]).tolist())
        info = o["segments_info"]
        assert [s["id"] for s in info] == sorted(set(ids) - {0})
        for s in info:
            assert set(s) == {"id", "category_id", "isthing", "area"}
            assert s["area"] == int((o["panoptic"] == s["id"]).sum())
            assert 1 <= s["category_id"] <= 2 if s["isthing"] else 0 <= s["category_id"] < 3


def test_fused_matches_reference_backend():
    """The same weights with the fused roi_align/roi_upsample kernels and with use_backend("reference")."""
    model = small_model(seed=4).eval()
    images = [scene(seed=2)[0]]
    with torch.no_grad():
        fused = model(images)[0]
        with ops.use_backend("reference"):
            ref = model(images)[0]
    torch.testing.assert_close(fused["boxes"], ref["boxes"], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(fused["scores"], ref["scores"], atol=1e-4, rtol=1e-4)
    assert torch.equal(fused["semantic"], ref["semantic"])


def test_background_branch_fused_matches_reference_for_fixed_rois():
    """The background branch (PAM, MAM with roi_upsample) on the same features, RPN features and RoI mask
    logits: the fused and the reference roi_upsample give the same stuff logits (the end-to-end model can
    differ more, as the boxes themselves carry float32 rounding of roi_align into the adaptive grid)."""
    model = small_model(seed=5).eval()
    torch.manual_seed(6)
    feats = {name: torch.randn(2, 32, 16 >> i, 16 >> i) for i, name in enumerate(("0", "1", "2", "3"))}
    shared = [torch.randn_like(f) for f in feats.values()]
    xy = torch.rand(9, 2) * 50
    boxes = torch.cat([xy, xy + 3 + torch.rand(9, 2) * 40], 1)
    logits = torch.randn(9, 1, 28, 28) * 5
    with torch.no_grad():
        fused = model._background(feats, shared, logits, [boxes[:4], boxes[4:]], (64, 64))
        with ops.use_backend("reference"):
            ref = model._background(feats, shared, logits, [boxes[:4], boxes[4:]], (64, 64))
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)


# ---- panoptic fusion on hand-made cases ----

def _masks(h: int, w: int, *rects: tuple[int, int, int, int]) -> torch.Tensor:
    m = torch.zeros(len(rects), h, w, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(rects):
        m[i, y0:y1, x0:x1] = True
    return m


def test_fusion_overlapping_instances_go_by_score():
    masks = _masks(8, 8, (0, 4, 0, 4), (2, 6, 2, 6))  # overlap of 4 px; the second has 16 px
    sem = torch.zeros(8, 8, dtype=torch.long)
    pan, info = panoptic_fusion(masks, torch.tensor([0.6, 0.9]), torch.tensor([1, 2]), sem, 2, stuff_min_area=1)
    assert info[0] == {"id": 1, "category_id": 2, "isthing": True, "area": 16}  # higher score first, whole
    assert info[1] == {"id": 2, "category_id": 1, "isthing": True, "area": 12}  # 12/16 visible >= 50%
    assert (pan[2:6, 2:6] == 1).all() and (pan[0:2, 0:4] == 2).all()
    assert info[2] == {"id": 3, "category_id": 0, "isthing": False, "area": 64 - 28}


def test_fusion_drops_mostly_occluded_instances_and_low_scores():
    masks = _masks(8, 8, (0, 8, 0, 8), (0, 4, 0, 3), (0, 1, 0, 1))
    scores = torch.tensor([0.95, 0.8, 0.4])
    pan, info = panoptic_fusion(masks, scores, torch.tensor([1, 2, 2]), torch.zeros(8, 8, dtype=torch.long), 1,
                                stuff_min_area=1)
    assert info == [{"id": 1, "category_id": 1, "isthing": True, "area": 64}]  # 2: 0% visible; 3: score 0.4
    assert (pan == 1).all()


def test_fusion_small_stuff_and_unclaimed_things_become_void():
    sem = torch.zeros(10, 10, dtype=torch.long)
    sem[:, 7:] = 1  # 30 px of stuff 1 (below 31)
    sem[8:, :3] = 2  # "things" (num_stuff_classes = 2) with no instance: void
    pan, info = panoptic_fusion(torch.zeros(0, 10, 10, dtype=torch.bool), torch.zeros(0), torch.zeros(0), sem, 2,
                                stuff_min_area=31)
    assert info == [{"id": 1, "category_id": 0, "isthing": False, "area": 64}]
    assert (pan[:, 7:] == 0).all() and (pan[8:, :3] == 0).all()
    pan, info = panoptic_fusion(torch.zeros(0, 10, 10, dtype=torch.bool), torch.zeros(0), torch.zeros(0), sem, 2,
                                stuff_min_area=30)
    assert [s["category_id"] for s in info] == [0, 1] and int((pan == 0).sum()) == 6
    with pytest.raises(ValueError, match="same size"):
        panoptic_fusion(torch.zeros(1, 4, 4, dtype=torch.bool), torch.ones(1), torch.ones(1),
                        torch.zeros(5, 4, dtype=torch.long), 2)


# ---- overfitting synthetic scenes ----

def synthetic_scenes(n: int, size: int = 64, seed: int = 0) -> tuple[list, list, list]:
    """n images: sky over ground (stuff 0 / 1, horizon at a random height) with 1-2 non-overlapping
    red (thing 1) or green (thing 2) rectangles, light noise. Returns images, training targets and
    the ground-truth (panoptic, segments_info) pairs."""
    g = torch.Generator().manual_seed(seed)
    colors = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.9, 0.1)}
    images, targets, gts = [], [], []
    for _ in range(n):
        horizon = int(torch.randint(20, 44, (1,), generator=g))
        sem = torch.zeros(size, size, dtype=torch.long)
        sem[horizon:] = 1
        img = torch.empty(3, size, size)
        img[:, :horizon] = torch.tensor([0.3, 0.5, 0.9]).view(3, 1, 1)
        img[:, horizon:] = torch.tensor([0.6, 0.5, 0.3]).view(3, 1, 1)
        boxes, labels, masks = [], [], []
        taken = torch.zeros(size, size, dtype=torch.bool)
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            w, h = (int(v) for v in torch.randint(14, 26, (2,), generator=g))
            x = int(torch.randint(0, size - w, (1,), generator=g))
            y = int(torch.randint(0, size - h, (1,), generator=g))
            m = torch.zeros(size, size, dtype=torch.bool)
            m[y:y + h, x:x + w] = True
            if (m & taken).any():
                continue
            taken |= m
            c = int(torch.randint(1, 3, (1,), generator=g))
            img[:, m] = torch.tensor(colors[c]).view(3, 1)
            boxes.append([x, y, x + w, y + h])
            labels.append(c)
            masks.append(m)
        img += 0.03 * torch.randn(img.shape, generator=g)
        masks = torch.stack(masks)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "masks": masks.to(torch.uint8), "semantic": sem})
        pan = torch.zeros(size, size, dtype=torch.int32)
        info = []
        for j, (m, c) in enumerate(zip(masks, labels, strict=True)):
            pan[m] = j + 1
            info.append({"id": j + 1, "category_id": c, "isthing": True})
        for c in range(2):
            info.append({"id": len(info) + 1, "category_id": c, "isthing": False})
            pan[(sem == c) & (pan == 0)] = info[-1]["id"]
        images.append(img)
        gts.append((pan, info))
    return images, targets, gts


def test_overfits_synthetic_scenes():
    """ResNet-18 AUNet from scratch on 4 synthetic 64x64 scenes: after 50 AdamW steps the panoptic
    quality on the training images is >= 0.5 (measured here: ~0.89 at 50 steps, ~0.96 at 150)."""
    from fastseg.metrics import panoptic_quality

    torch.manual_seed(0)
    model = create_model("aunet", num_classes=2, num_stuff_classes=2, **{
        **SMALL, "rpn_batch_size_per_image": 64, "rpn_pre_nms_top_n_train": 400, "rpn_post_nms_top_n_train": 200,
        "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100})
    images, targets, gts = synthetic_scenes(4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(50):
        model.train()
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(images)
    result = panoptic_quality([(o["panoptic"], o["segments_info"]) for o in out], gts)
    assert result["pq"] >= 0.5, result
