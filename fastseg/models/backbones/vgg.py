"""VGG-16 (Simonyan & Zisserman, configuration D) returning intermediate features by name.

The convolutional part keeps torchvision's layout: one ``features`` ``nn.Sequential`` whose indices
(0 = conv1_1, 4 = pool1, ..., 30 = pool5) give the same state-dict names as
``torchvision.models.vgg16().features``, so a local torchvision checkpoint loads as is (its
``classifier.*`` entries are ignored here; FCN turns them into its fc6/fc7 convolutions with
:func:`read_vgg16_checkpoint`). No code downloads weights.

Example::

    >>> net = VGG16(out_features=("pool3", "pool4", "pool5"))
    >>> {k: tuple(v.shape) for k, v in net(torch.randn(1, 3, 64, 96)).items()}
    {'pool3': (1, 256, 8, 12), 'pool4': (1, 512, 4, 6), 'pool5': (1, 512, 2, 3)}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["VGG16", "VGG16_WIDTHS", "read_vgg16_checkpoint", "vgg16"]

VGG16_WIDTHS = (64, 128, 256, 512, 512)
_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


def _layer_names() -> list[str]:
    """Names of the 31 layers of ``features`` in order: conv1_1, relu1_1, ..., pool5."""
    names = []
    for b, n in enumerate(_CONVS_PER_BLOCK, start=1):
        for i in range(1, n + 1):
            names += [f"conv{b}_{i}", f"relu{b}_{i}"]
        names.append(f"pool{b}")
    return names


LAYER_NAMES = tuple(_layer_names())


def read_vgg16_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict stored at ``path`` (a bare state dict, or one nested under ``"state_dict"`` /
    ``"model"``), loaded on the CPU with ``weights_only=True``.

    Example::

        >>> torch.save(torchvision.models.vgg16().state_dict(), "vgg16.pth")
        >>> sorted(read_vgg16_checkpoint("vgg16.pth"))[:2]
        ['classifier.0.bias', 'classifier.0.weight']
    """
    if not os.path.isfile(path):
        raise ValueError(f"backbone_weights: no such file {os.fspath(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"backbone_weights: {os.fspath(path)!r} holds no state dict of tensors")
    return dict(state)


class VGG16(nn.Module):
    """The 13 convolutions and 5 max-poolings of VGG-16, torchvision's parameter names.

    Features (name: channels, stride): ``conv{b}_{i}`` / ``relu{b}_{i}`` (block b, conv i) with
    ``widths[b-1]`` channels at stride 2^(b-1), and ``pool{b}`` at stride 2^b. ``forward`` returns
    the names in ``out_features`` and stops after the last one.

    FCN needs two departures from the classifier, both options here: ``first_padding=100`` (conv1_1
    padding, so that fc6's 7×7 window fits any input) and ``ceil_mode=True`` (Caffe's pooling rounds
    up). ``widths`` exists for small test models; the paper's are ``VGG16_WIDTHS``.

    Args:
        in_channels: input channels (3 for RGB).
        widths: channels of the five blocks.
        first_padding: padding of conv1_1 (1 in VGG, 100 in FCN).
        ceil_mode: ceil-mode pooling (Caffe) instead of floor (torchvision).
        weights: path of a local torchvision VGG-16 checkpoint (``classifier.*`` ignored).
        out_features: names to return (default: pool1 ... pool5).

    Shape: [N, in_channels, H, W] → {name: [N, C, H', W']}; with the defaults pool b has
    H' = floor(H / 2^b).

    Example::

        >>> net = VGG16(first_padding=100, ceil_mode=True, out_features=("pool5",))
        >>> net(torch.randn(1, 3, 65, 81))["pool5"].shape
        torch.Size([1, 512, 9, 9])
    """

    def __init__(self, in_channels: int = 3, *, widths: Sequence[int] = VGG16_WIDTHS, first_padding: int = 1,
                 ceil_mode: bool = False, weights: str | os.PathLike | None = None,
                 out_features: Sequence[str] | None = None) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        widths = tuple(widths)
        if len(widths) != 5 or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            raise ValueError(f"widths must be 5 positive ints, got {widths!r}")
        if not isinstance(first_padding, int) or first_padding < 0:
            raise ValueError(f"first_padding must be a non-negative int, got {first_padding!r}")
        out_features = tuple(("pool1", "pool2", "pool3", "pool4", "pool5") if out_features is None else out_features)
        unknown = [f for f in out_features if f not in LAYER_NAMES]
        if unknown or not out_features:
            raise ValueError(f"out_features must name layers among {LAYER_NAMES}, got {out_features!r}")

        layers: list[nn.Module] = []
        self.channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        c_in = in_channels
        for b, (n, width) in enumerate(zip(_CONVS_PER_BLOCK, widths, strict=True), start=1):
            for i in range(1, n + 1):
                pad = first_padding if (b, i) == (1, 1) else 1
                # not in place: a requested conv output must survive its ReLU
                layers += [nn.Conv2d(c_in, width, 3, padding=pad), nn.ReLU()]
                for name in (f"conv{b}_{i}", f"relu{b}_{i}"):
                    self.channels[name], self.strides[name] = width, 2 ** (b - 1)
                c_in = width
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=ceil_mode))
            self.channels[f"pool{b}"], self.strides[f"pool{b}"] = width, 2**b
        self.features = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.out_features = out_features
        self._last = max(LAYER_NAMES.index(f) for f in out_features)
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if weights is not None:
            self.load_torchvision_state(read_vgg16_checkpoint(weights))

    def load_torchvision_state(self, state: Mapping[str, Tensor]) -> None:
        """Copy the ``features.*`` entries of a torchvision VGG-16 state dict (others ignored).

        All 26 conv tensors must be present with this network's shapes, except that conv1_1's input
        channels may differ (``in_channels != 3``), adapted as timm does: summed over RGB for one
        channel, else tiled over the new channels and scaled by 3 / in_channels."""
        own = {k: v for k, v in self.state_dict().items()}
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        missing = sorted(set(own) - set(feats))
        unexpected = sorted(set(feats) - set(own))
        if missing or unexpected:
            raise ValueError(f"backbone_weights: not a VGG-16 features state dict (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})")
        for key, value in feats.items():
            target = own[key]
            if key == "features.0.weight" and value.shape != target.shape and value.shape[0] == target.shape[0] \
                    and value.shape[2:] == target.shape[2:]:
                c_in = target.shape[1]
                if c_in == 1:  # a grey image is R = G = B: the summed filter gives the same response
                    value = value.sum(1, keepdim=True)
                else:
                    reps = -(-c_in // value.shape[1])
                    value = value.repeat(1, reps, 1, 1)[:, :c_in] * (value.shape[1] / c_in)
            if value.shape != target.shape:
                raise ValueError(f"backbone_weights: {key} has shape {tuple(value.shape)}, "
                                 f"this network needs {tuple(target.shape)}")
            feats[key] = value
        self.load_state_dict(feats, strict=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        feats: dict[str, Tensor] = {}
        for i, layer in enumerate(self.features):
            if i > self._last:
                break
            x = layer(x)
            if LAYER_NAMES[i] in self.out_features:
                feats[LAYER_NAMES[i]] = x
        return feats


def vgg16(**kwargs) -> VGG16:
    """VGG-16 features; keyword arguments as :class:`VGG16`."""
    return VGG16(**kwargs)
