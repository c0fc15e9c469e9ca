"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) and its overlap-tile prediction.

The paper's network: a contracting path of 3×3 unpadded convolutions + ReLU (two per level;
64, 128, 256, 512, 1024 channels) with 2×2 max-pooling, dropout at its end, and an expanding path of
2×2 up-convolutions halving the channels, concatenation with the centre-cropped encoder features and
two 3×3 convolutions + ReLU, closed by a 1×1 convolution to the classes: 23 convolutional layers,
31,030,658 parameters for one input channel and two classes. Weights start as the paper says:
Gaussian with standard deviation sqrt(2 / N), N the number of inputs of one neuron.

``padding="valid"`` (default) is the paper's: the output is the valid region of the input, smaller by
184 pixels (92 a side), and the input must be 188 + 16k pixels high and wide (k ≥ 0) so that every
max-pooling sees an even size: 572 → 388. ``padding="same"`` pads every 3×3 convolution (and the input,
at the bottom and right, to a multiple of 16) and returns logits at the input's H×W; ``batch_norm=True``
adds BatchNorm after every 3×3 convolution (not in the paper; either mode).

:func:`overlap_tile_predict` segments an image of any size by the paper's overlap-tile strategy,
mirroring the image at its borders so that every output pixel comes from a tile where it has its full
context.

Example::

    >>> from fastseg.models import create_model
    >>> model = create_model("unet", num_classes=2).eval()        # 1 input channel, valid padding
    >>> model(torch.randn(1, 1, 572, 572))["out"].shape
    torch.Size([1, 2, 388, 388])
    >>> overlap_tile_predict(model, torch.randn(1, 1, 700, 500)).shape
    torch.Size([1, 2, 700, 500])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet", "overlap_tile_predict", "unet", "valid_input_sizes", "valid_output_size"]

_DEPTH = 4  # max-poolings
_FACTOR = 2**_DEPTH  # 16: inputs of the valid network step by this
# Pixels lost in valid mode: 4 per level on each path, at that level's scale, plus 4 at the bottom.
_VALID_LOSS = 4 * (2 * sum(2**i for i in range(_DEPTH)) + 2**_DEPTH)  # 184
_VALID_MIN_INPUT = _VALID_LOSS + 4  # 188: the smallest input, 4×4 out
_VALID_CONTEXT = _VALID_LOSS // 2  # 92
# Same mode: an output pixel depends on inputs up to 107 px away on one side (worst pooling phase);
# rounded up to a multiple of 16 so that a tile's trusted centre keeps the image's pooling grid.
_SAME_CONTEXT = 112


def valid_output_size(size: int) -> int:
    """Output height (or width) of the valid-padding U-Net for an input of ``size`` pixels:
    ``size - 184``; ``size`` must be 188 + 16k (k ≥ 0), else ``ValueError`` names the nearest valid sizes.

    Example::

        >>> valid_output_size(572)
        388
    """
    _check_valid_size("size", size)
    return size - _VALID_LOSS


def _check_valid_size(what: str, size: int) -> None:
    if size < _VALID_MIN_INPUT or (size - _VALID_MIN_INPUT) % _FACTOR:
        lo, hi = valid_input_sizes(size)
        near = f"{hi}" if lo is None else f"{lo} or {hi}"
        raise ValueError(f"{what} {size} is not a valid input size of the valid-padding U-Net (188 + 16k, "
                         f"output = input - {_VALID_LOSS}); nearest valid sizes: {near}")


def valid_input_sizes(size: int) -> tuple[int | None, int]:
    """The valid-padding U-Net's input sizes nearest to ``size``: (largest ≤ size or None, smallest ≥ size).

    Example::

        >>> valid_input_sizes(500)
        (492, 508)
    """
    if size <= _VALID_MIN_INPUT:
        return (_VALID_MIN_INPUT if size == _VALID_MIN_INPUT else None), _VALID_MIN_INPUT
    k = (size - _VALID_MIN_INPUT) // _FACTOR
    lo = _VALID_MIN_INPUT + _FACTOR * k
    return lo, (lo if lo == size else lo + _FACTOR)


def _check_pos_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class _DoubleConv(nn.Sequential):
    """Two 3×3 convolutions, each followed by (BatchNorm and) ReLU."""

    def __init__(self, c_in: int, c_out: int, padding: int, batch_norm: bool) -> None:
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            layers.append(nn.Conv2d(c, c_out, 3, padding=padding, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def _center_crop(x: Tensor, like: Tensor) -> Tensor:
    """The centre of ``x`` at ``like``'s H×W (the paper's cropping of the encoder features)."""
    dh, dw = x.shape[-2] - like.shape[-2], x.shape[-1] - like.shape[-1]
    return x[..., dh // 2:dh // 2 + like.shape[-2], dw // 2:dw // 2 + like.shape[-1]]


class UNet(nn.Module):
    """U-Net; see the module docstring.

    Args:
        num_classes: output channels (2 in the paper).
        in_channels: input channels (1 in the paper).
        padding: ``"valid"`` (paper: output = input - 184, input 188 + 16k) or ``"same"`` (any H×W).
        batch_norm: BatchNorm after every 3×3 convolution (convolutions then have no bias).
        base_channels: channels of the first level (64), doubled per level to 16× at the bottom.
        dropout: dropout probability at the end of the contracting path (the paper uses dropout
            there without naming a rate; 0.5, Caffe's default, here).

    Shape: [N, in_channels, H, W] → {"out": [N, num_classes, H - 184, W - 184]} (valid) or
    {"out": [N, num_classes, H, W]} (same).

    Example::

        >>> model = UNet(3, in_channels=3, padding="same", base_channels=16).eval()
        >>> model(torch.randn(1, 3, 97, 129))["out"].shape
        torch.Size([1, 3, 97, 129])
    """

    def __init__(self, num_classes: int = 2, in_channels: int = 1, padding: str = "valid", batch_norm: bool = False,
                 base_channels: int = 64, dropout: float = 0.5) -> None:
        super().__init__()
        _check_pos_int("num_classes", num_classes)
        _check_pos_int("in_channels", in_channels)
        _check_pos_int("base_channels", base_channels)
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_classes, self.in_channels, self.padding = num_classes, in_channels, padding
        pad = 0 if padding == "valid" else 1
        widths = [base_channels * 2**i for i in range(_DEPTH + 1)]
        self.encoder = nn.ModuleList(
            _DoubleConv(c_in, c_out, pad, batch_norm) for c_in, c_out in zip([in_channels, *widths[:-1]], widths,
                                                                              strict=True))
        self.dropout = nn.Dropout(dropout)
        self.upconvs = nn.ModuleList(nn.ConvTranspose2d(c, c // 2, 2, stride=2) for c in widths[:0:-1])
        self.decoder = nn.ModuleList(_DoubleConv(c, c // 2, pad, batch_norm) for c in widths[:0:-1])
        self.head = nn.Conv2d(base_channels, num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # Paper: N(0, sqrt(2 / N)), N = inputs of one neuron: 9·C_in for a 3×3 conv, C_in for the 1×1
        # head and for a 2×2 stride-2 up-conv (each output pixel sees one tap of each input channel).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1])))
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.in_channels))
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def context(self) -> int:
        """Pixels of context an output pixel needs on each side: 92 (valid; exact) or 112 (same; the
        worst case over pooling phases, 107, rounded up to a multiple of 16)."""
        return _VALID_CONTEXT if self.padding == "valid" else _SAME_CONTEXT

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.padding == "valid":
            _check_valid_size("x: height", h)
            _check_valid_size("x: width", w)
        else:  # zeros at the bottom/right only: the pooling grid stays anchored at the image's origin
            x = F.pad(x, (0, -w % _FACTOR, 0, -h % _FACTOR))
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x)
            if i < _DEPTH:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        x = self.dropout(x)
        for up, block, skip in zip(self.upconvs, self.decoder, reversed(skips), strict=True):
            x = up(x)
            x = block(torch.cat([_center_crop(skip, x), x], dim=1))
        out = self.head(x)
        if self.padding == "same":
            out = out[..., :h, :w]
        return {"out": out}


def _mirror_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices into a length-``n`` axis for positions -before .. n + after - 1, mirrored at the ends
    (numpy's "reflect", repeated as often as the padding needs)."""
    idx = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def _axis_plan(size: int, tile: int, valid: bool, context: int) -> tuple[int, int, int, int, int]:
    """Tiling of one axis: (tile, step, tiles, pad_before, pad_after).

    A tile at padded offset t trusts the padded positions [t + a, t + a + o): a = context, o = tile - 2a.
    The image is padded by pad_before (``a`` rounded up to 16) and steps are multiples of 16, so every
    tile keeps the image's own pooling grid: the result equals one forward pass over the padded image.
    """
    pad_before = -(-context // _FACTOR) * _FACTOR
    lead = pad_before - context  # trusted rows start this far before the image (4 valid, 0 same)
    need = size + lead  # trusted length one tile would need
    if valid:
        smallest = valid_input_sizes(need + _VALID_LOSS)[1]
    else:
        smallest = -(-(need + 2 * context) // _FACTOR) * _FACTOR
    tile = min(tile, smallest)
    trusted = tile - 2 * context
    step = trusted // _FACTOR * _FACTOR
    tiles = 1 if trusted >= need else 1 + -(-(need - trusted) // step)
    pad_after = (tiles - 1) * step + tile - pad_before - size
    return tile, step, tiles, pad_before, pad_after


@torch.no_grad()
def overlap_tile_predict(model: UNet, image: Tensor, tile: int | tuple[int, int] | None = None) -> Tensor:
    """Segment ``image`` of any size by the overlap-tile strategy (paper, Fig. 2).

    The image is mirrored at its borders; tiles of ``tile`` pixels (at most; smaller when the image
    needs less) step by multiples of 16 so that each output pixel comes from a tile in which it has its
    full context (``model.context`` pixels on every side), on the image's own max-pooling grid. Hence
    the result equals one forward pass over the mirrored image, and, wherever a direct forward of the
    unpadded image is valid (valid mode: its whole output, which starts 92 px in; same mode: pixels at
    least 112 px from the border), it equals that forward pass too. Works for both padding modes; run
    the model in ``eval()`` mode (dropout, BatchNorm statistics). Runs without autograd.

    Args:
        model: a :class:`UNet` (any ``padding``).
        image: [N, C, H, W] or [C, H, W], any H, W ≥ 1.
        tile: input tile size, int or (h, w). Valid mode: 188 + 16k with at least 16 px of step
            (≥ 204; default 572, the paper's). Same mode: a multiple of 16 ≥ 240 (default 512).

    Returns:
        logits [N, num_classes, H, W] (or [num_classes, H, W] for a 3-D ``image``).

    Example::

        >>> model = unet(num_classes=2, base_channels=8).eval()
        >>> overlap_tile_predict(model, torch.randn(1, 1, 300, 301), tile=268).shape
        torch.Size([1, 2, 300, 301])
    """
    if not isinstance(model, UNet):
        raise ValueError(f"model must be a fastseg U-Net, got {type(model).__name__}")
    if not isinstance(image, Tensor) or image.dim() not in (3, 4) or image.shape[-3] != model.in_channels:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be [N, {model.in_channels}, H, W] or [{model.in_channels}, H, W], got {shape}")
    if image.shape[-1] < 1 or image.shape[-2] < 1:
        raise ValueError(f"image must have H, W >= 1, got {tuple(image.shape)}")
    squeeze = image.dim() == 3
    x = image.unsqueeze(0) if squeeze else image
    valid = model.padding == "valid"
    context = model.context
    if tile is None:
        tile = 572 if valid else 512
    tiles_hw = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if len(tiles_hw) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) for t in tiles_hw):
        raise ValueError(f"tile must be an int or a pair of ints, got {tile!r}")
    for t in tiles_hw:
        if valid and (t < _VALID_MIN_INPUT + _FACTOR or (t - _VALID_MIN_INPUT) % _FACTOR):
            raise ValueError(f"tile must be 188 + 16k with k >= 1 for the valid-padding U-Net (e.g. 572), got {tile!r}")
        if not valid and (t % _FACTOR or t < 2 * context + _FACTOR):
            raise ValueError(f"tile must be a multiple of 16 >= {2 * context + _FACTOR} for the same-padding "
                             f"U-Net (e.g. 512), got {tile!r}")

    n, _, h, w = x.shape
    (th, sh, nh, top, bottom), (tw, sw, nw, left, right) = (
        _axis_plan(h, tiles_hw[0], valid, context), _axis_plan(w, tiles_hw[1], valid, context))
    padded = x.index_select(-2, _mirror_index(h, top, bottom, x.device))
    padded = padded.index_select(-1, _mirror_index(w, left, right, x.device))
    out: Tensor | None = None
    # model output index j of a tile at padded offset t holds padded position t + shift + j
    shift = context if valid else 0
    first = 0 if valid else context  # first trusted model-output index
    for i in range(nh):
        for j in range(nw):
            y0, x0 = i * sh, j * sw
            pred = model(padded[..., y0:y0 + th, x0:x0 + tw])["out"]
            if out is None:
                out = pred.new_empty(n, pred.shape[1], h, w)
            # image rows this tile trusts, clipped to the image
            r0, c0 = y0 + shift + first - top, x0 + shift + first - left
            r1, c1 = r0 + th - 2 * context, c0 + tw - 2 * context
            rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
            out[..., rr0:rr1, cc0:cc1] = pred[..., rr0 - r0 + first:rr1 - r0 + first,
                                              cc0 - c0 + first:cc1 - c0 + first]
    assert out is not None
    return out.squeeze(0) if squeeze else out


def unet(num_classes: int = 2, in_channels: int = 1, padding: str = "valid", batch_norm: bool = False,
         base_channels: int = 64, **kwargs: Any) -> UNet:
    """U-Net with the paper's defaults (1 input channel, 2 classes, valid padding, 64 base channels).
    Further keywords (``dropout``) as :class:`UNet`.

    Example::

        >>> unet()(torch.randn(1, 1, 572, 572))["out"].shape
        torch.Size([1, 2, 388, 388])
    """
    return UNet(num_classes, in_channels, padding, batch_norm, base_channels, **kwargs)
