"""ESPNet (Mehta et al., ECCV 2018): ESPNet-A, -B, -C and the full ESPNet on fastseg's ESPModule.

Structure (paper Fig. 4 and the authors' public code, sacmehta/ESPNet):

* level 1: 3×3 conv stride 2 → 16 channels (conv + BN + PReLU) at 1/2.
* level 2: a strided ESP module → 64 channels at 1/4, then ``alpha2`` ESP modules (64 → 64).
* level 3: a strided ESP module → 128 at 1/8, then ``alpha3`` ESP modules (128 → 128).
* a 1×1 classifier (no bias) to the classes at 1/8.

The variants differ in what feeds the strided modules and the classifier:

* ``espnet_a``: plain stacking (16 → 64, 64 → 128, classifier on 128).
* ``espnet_b``: long-range shortcuts: the strided module's output is concatenated with the
  stage's last ESP output (BN + PReLU over the concat): 128 into level 3, 256 into the classifier.
* ``espnet_c``: B plus input reinforcement: the image, average-pooled (3×3, stride 2) to 1/2 and
  1/4, is concatenated into levels 2 and 3 (16 + 3 → 64, 128 + 3 → 128). This is the authors'
  ``ESPNet_Encoder``.
* ``espnet``: C plus the light decoder: the 1/8 logits (BN) go up 2× by a 2×2 deconvolution,
  are concatenated with a 1×1 projection of the level-2 features to classes, fused by BN + PReLU
  + an ESP module (2 classes → classes, no residual), go up 2× (deconvolution + BN + PReLU), are
  concatenated with the level-1 conv output (16 channels, before the image is concatenated), fused
  by 3×3 conv + BN + PReLU, and a last 2×2 deconvolution gives full-resolution logits. This is the
  authors' ``ESPNet`` as in their released model (test/Model.py and the released Cityscapes
  checkpoint espnet_p_2_q_8.pth: 364,569 parameters, the published 0.364 M); their training script's
  copy fuses the 19-channel level-1 concat instead (540 parameters more).

The authors' code has only C and the full network; A and B follow the paper's Fig. 4, with B's concats
normalised (BN + PReLU) as C's are.

A/B/C's 1/8-resolution logits are upsampled bilinearly to the input size in ``"out"``. Every
variant takes any input size: it is zero-padded (bottom/right) to a multiple of 8 and the output
cropped back. All convolutions are bias-free and every BatchNorm has eps 1e-3, as the authors'.

Parameter counts at the defaults (alpha2 = 2, alpha3 = 8, 20 classes, RGB), derived layer by layer in
tests/test_models_espnet.py: espnet_a 330,272, espnet_b 348,384, espnet_c 349,449 and espnet 364,569;
the last two equal the counts of the authors' released Cityscapes checkpoints (encoder and decoder,
p = 2, q = 8), the published 0.364 M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastseg.models.deeplab import _check_input, _check_int
from fastseg.nn import ESPModule

__all__ = ["ESPNet", "espnet", "espnet_a", "espnet_b", "espnet_c"]

_VARIANTS = ("a", "b", "c", "full")


def _cbr(n_in: int, n_out: int, k: int, stride: int = 1) -> nn.Sequential:
    """k×k conv (no bias, 'same' padding) + BatchNorm (eps 1e-3) + PReLU."""
    return nn.Sequential(nn.Conv2d(n_in, n_out, k, stride, (k - 1) // 2, bias=False), _br(n_out))


def _br(n: int) -> nn.Sequential:
    """BatchNorm (eps 1e-3) + PReLU."""
    return nn.Sequential(nn.BatchNorm2d(n, eps=1e-3), nn.PReLU(n))


def _pool_image(x: Tensor, times: int) -> Tensor:
    """Input reinforcement: the image average-pooled (3×3, stride 2, padding 1) ``times`` times."""
    for _ in range(times):
        x = F.avg_pool2d(x, 3, stride=2, padding=1)
    return x


class ESPNet(nn.Module):
    """ESPNet-A/B/C or the full ESPNet (``variant`` "a", "b", "c", "full"); see the module docstring.

    Shape: [N, in_channels, H, W] → ``{"out": [N, num_classes, H, W]}`` (any H, W).

    Example::

        >>> model = ESPNet(num_classes=20, variant="full").eval()
        >>> model(torch.randn(1, 3, 101, 75))["out"].shape
        torch.Size([1, 20, 101, 75])
    """

    def __init__(self, num_classes: int = 20, variant: str = "full", alpha2: int = 2, alpha3: int = 8,
                 in_channels: int = 3) -> None:
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        _check_int(num_classes, "num_classes")
        _check_int(in_channels, "in_channels")
        for name, v in (("alpha2", alpha2), ("alpha3", alpha3)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if variant == "full" and num_classes < 5:
            raise ValueError(f"the full ESPNet's decoder ESP module needs num_classes >= 5, got {num_classes}")
        self.variant, self.in_channels = variant, in_channels
        shortcut = variant != "a"  # B and later concatenate each stage's input with its output
        reinforce = variant in ("c", "full")  # C and later concatenate the pooled image
        img = in_channels if reinforce else 0

        self.level1 = _cbr(in_channels, 16, 3, 2)
        self.b1 = _br(16 + img) if reinforce else nn.Identity()
        self.level2_0 = ESPModule(16 + img, 64, stride=2)
        self.level2 = nn.Sequential(*[ESPModule(64, 64) for _ in range(alpha2)])
        l2_out = 128 + img if shortcut else 64
        self.b2 = _br(l2_out) if shortcut else nn.Identity()
        self.level3_0 = ESPModule(l2_out, 128, stride=2)
        self.level3 = nn.Sequential(*[ESPModule(128, 128) for _ in range(alpha3)])
        l3_out = 256 if shortcut else 128
        self.b3 = _br(l3_out) if shortcut else nn.Identity()
        self.classifier = nn.Conv2d(l3_out, num_classes, 1, bias=False)
        if variant == "full":
            c = num_classes
            self.bn_l3 = nn.BatchNorm2d(c, eps=1e-3)
            self.up_l3 = nn.ConvTranspose2d(c, c, 2, stride=2, bias=False)
            self.proj_l2 = nn.Conv2d(l2_out, c, 1, bias=False)
            self.combine_l2_l3 = nn.Sequential(_br(2 * c), ESPModule(2 * c, c, add=False))
            self.up_l2 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2, bias=False), _br(c))
            self.fuse_l1 = _cbr(16 + c, c, 3)
            self.up_l1 = nn.ConvTranspose2d(c, c, 2, stride=2, bias=False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        _check_input(x, self.in_channels)
        h, w = x.shape[2], x.shape[3]
        ph, pw = (-h) % 8, (-w) % 8
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        reinforce = self.variant in ("c", "full")

        l1 = self.level1(x)
        l1_cat = self.b1(torch.cat([l1, _pool_image(x, 1)], 1)) if reinforce else l1
        l2_0 = self.level2_0(l1_cat)
        l2 = self.level2(l2_0)
        if self.variant != "a":
            parts = [l2, l2_0] + ([_pool_image(x, 2)] if reinforce else [])
            l2 = self.b2(torch.cat(parts, 1))
        l3_0 = self.level3_0(l2)
        l3 = self.level3(l3_0)
        if self.variant != "a":
            l3 = self.b3(torch.cat([l3_0, l3], 1))
        logits = self.classifier(l3)

        if self.variant == "full":
            up3 = self.up_l3(self.bn_l3(logits))
            up2 = self.up_l2(self.combine_l2_l3(torch.cat([self.proj_l2(l2), up3], 1)))
            out = self.up_l1(self.fuse_l1(torch.cat([up2, l1], 1)))
        else:
            out = F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)
        return {"out": out[:, :, :h, :w] if ph or pw else out}


def espnet_a(num_classes: int = 20, alpha2: int = 2, alpha3: int = 8, in_channels: int = 3) -> ESPNet:
    """ESPNet-A: stacked ESP modules, 1/8 logits upsampled bilinearly."""
    return ESPNet(num_classes, "a", alpha2, alpha3, in_channels)


def espnet_b(num_classes: int = 20, alpha2: int = 2, alpha3: int = 8, in_channels: int = 3) -> ESPNet:
    """ESPNet-B: ESPNet-A with the long-range shortcut concatenations."""
    return ESPNet(num_classes, "b", alpha2, alpha3, in_channels)


def espnet_c(num_classes: int = 20, alpha2: int = 2, alpha3: int = 8, in_channels: int = 3) -> ESPNet:
    """ESPNet-C: ESPNet-B with input reinforcement (the authors' ``ESPNet_Encoder``)."""
    return ESPNet(num_classes, "c", alpha2, alpha3, in_channels)


def espnet(num_classes: int = 20, alpha2: int = 2, alpha3: int = 8, in_channels: int = 3) -> ESPNet:
    """The full ESPNet: ESPNet-C with the light decoder to full resolution (0.36 M parameters)."""
    return ESPNet(num_classes, "full", alpha2, alpha3, in_channels)
