"""Data augmentation for segmentation: U-Net's elastic deformation.

Ronneberger et al. (2015), section 3.1: "random displacement vectors on a coarse 3 by 3 grid. The
displacements are sampled from a Gaussian distribution with 10 pixels standard deviation. Per-pixel
displacements are then computed using bicubic interpolation." The image is resampled with bicubic
interpolation and its mask with nearest-neighbour, through the same displacement field.

Example::

    >>> deform = ElasticDeformation(sigma=10.0, grid=3, seed=0)
    >>> image, mask = torch.rand(1, 128, 96), torch.randint(0, 3, (128, 96))
    >>> image2, mask2 = deform(image, mask)
    >>> image2.shape, mask2.shape, mask2.dtype
    (torch.Size([1, 128, 96]), torch.Size([128, 96]), torch.int64)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ElasticDeformation"]


class ElasticDeformation:
    """Random smooth elastic deformation of an image and (optionally) its mask.

    A displacement (dy, dx) ~ N(0, sigma²) pixels is drawn at each point of a ``grid`` × ``grid``
    lattice spanning the image (corners included), upsampled bicubically to a dense field [2, H, W],
    and the output at pixel p is the input at p + field(p): bicubic for the image, nearest for the
    mask, mirrored (``padding_mode="reflection"``) where p + field(p) leaves the image. Bicubic
    resampling may overshoot the input's range slightly; integer images are rounded and clamped.

    Args:
        sigma: standard deviation of the coarse displacements in pixels (10 in the paper); ≥ 0.
        grid: points per side of the coarse lattice (3 in the paper); ≥ 2.
        p: probability of deforming a sample (else it is returned unchanged).
        seed: seeds a private generator, so that a run of calls is reproducible.
        generator: a ``torch.Generator`` (CPU) to draw from instead (not with ``seed``); default: torch's
            global generator.
        padding_mode: ``grid_sample``'s ``"reflection"``, ``"border"`` or ``"zeros"``.

    Call: ``deform(image, mask=None)`` with image [C, H, W] or [H, W] (float or integer) and mask
    [H, W] or [1, H, W] (any dtype); returns the deformed image, or (image, mask), same shapes and dtypes.
    :meth:`sample_field` and :meth:`apply` expose the two steps.

    Example::

        >>> deform = ElasticDeformation(seed=0)
        >>> field = deform.sample_field(64, 80)                 # [2, 64, 80], pixels
        >>> img, msk = ElasticDeformation.apply(torch.rand(3, 64, 80), field, torch.ones(64, 80, dtype=torch.bool))
    """

    def __init__(self, sigma: float = 10.0, grid: int = 3, p: float = 1.0, *, seed: int | None = None,
                 generator: torch.Generator | None = None, padding_mode: str = "reflection") -> None:
        if not (isinstance(sigma, (int, float)) and sigma >= 0):
            raise ValueError(f"sigma must be a non-negative number, got {sigma!r}")
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 2:
            raise ValueError(f"grid must be an int >= 2, got {grid!r}")
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if padding_mode not in ("reflection", "border", "zeros"):
            raise ValueError(f"padding_mode must be 'reflection', 'border' or 'zeros', got {padding_mode!r}")
        self.sigma, self.grid, self.p, self.padding_mode = float(sigma), grid, float(p), padding_mode
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else generator

    def __repr__(self) -> str:
        return f"ElasticDeformation(sigma={self.sigma}, grid={self.grid}, p={self.p})"

    def sample_field(self, height: int, width: int, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> Tensor:
        """A dense displacement field [2, height, width] in pixels ((dy, dx) per pixel), drawn on the CPU
        from this transform's generator."""
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be >= 1, got {height}, {width}")
        coarse = torch.randn(1, 2, self.grid, self.grid, generator=self.generator, dtype=torch.float64) * self.sigma
        dense = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
        return dense[0].to(dtype=dtype, device=device)

    @staticmethod
    def apply(image: Tensor, field: Tensor, mask: Tensor | None = None, *,
              padding_mode: str = "reflection") -> Tensor | tuple[Tensor, Tensor]:
        """Warp ``image`` (bicubic) and ``mask`` (nearest) by ``field`` [2, H, W]: out(p) = in(p + field(p)).
        Shapes as :class:`ElasticDeformation`'s call."""
        img, squeeze_img = _as_chw(image, "image")
        h, w = img.shape[-2:]
        if not isinstance(field, Tensor) or field.shape != (2, h, w):
            raise ValueError(f"field must be [2, {h}, {w}], got "
                             f"{tuple(field.shape) if isinstance(field, Tensor) else type(field).__name__}")
        work = img.dtype if img.is_floating_point() else torch.float32
        grid = _sampling_grid(field.to(device=img.device, dtype=torch.float64), h, w)
        out = F.grid_sample(img[None].to(work), grid.to(work), mode="bicubic", padding_mode=padding_mode,
                            align_corners=True)[0]
        if not img.is_floating_point():
            info = torch.iinfo(img.dtype)
            out = out.round().clamp(info.min, info.max)
        out = out.to(img.dtype)
        out = out[0] if squeeze_img else out
        if mask is None:
            return out
        if not isinstance(mask, Tensor) or mask.shape[-2:] != (h, w) or mask.dim() not in (2, 3) \
                or (mask.dim() == 3 and mask.shape[0] != 1):
            raise ValueError(f"mask must be [{h}, {w}] or [1, {h}, {w}] like image, got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        # float64 carries any label up to 2**53 exactly through nearest sampling
        m = F.grid_sample(mask.reshape(1, 1, h, w).to(torch.float64), grid, mode="nearest",
                          padding_mode=padding_mode, align_corners=True).reshape(mask.shape)
        m = (m > 0.5) if mask.dtype == torch.bool else m.to(mask.dtype)
        return out, m

    def __call__(self, image: Tensor, mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        img, _ = _as_chw(image, "image")
        if self.p < 1.0 and torch.rand((), generator=self.generator).item() >= self.p:
            return image if mask is None else (image, mask)
        field = self.sample_field(*img.shape[-2:], dtype=torch.float64, device=img.device)
        return self.apply(image, field, mask, padding_mode=self.padding_mode)


def _as_chw(image: Tensor, name: str) -> tuple[Tensor, bool]:
    if not isinstance(image, Tensor) or image.dim() not in (2, 3) or image.shape[-1] < 1 or image.shape[-2] < 1:
        raise ValueError(f"{name} must be a [C, H, W] or [H, W] tensor with H, W >= 1, got "
                         f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
    return (image[None], True) if image.dim() == 2 else (image, False)


def _sampling_grid(field: Tensor, h: int, w: int) -> Tensor:
    """grid_sample's [1, H, W, 2] (x, y) grid in [-1, 1] (align_corners=True) for p + field(p)."""
    ys = torch.arange(h, dtype=field.dtype, device=field.device)[:, None] + field[0]
    xs = torch.arange(w, dtype=field.dtype, device=field.device)[None, :] + field[1]
    # align_corners=True: -1 and 1 are the centres of the first and last pixels; a 1-pixel axis maps to 0
    gy = ys * (2.0 / (h - 1)) - 1.0 if h > 1 else torch.zeros_like(ys)
    gx = xs * (2.0 / (w - 1)) - 1.0 if w > 1 else torch.zeros_like(xs)
    return torch.stack([gx, gy], dim=-1)[None]
