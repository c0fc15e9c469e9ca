"""fastseg.transforms.ElasticDeformation: image and mask stay aligned (one field for both), the
field's law (coarse 3×3 Gaussian, σ = 10 px, bicubic), determinism with a seed, shapes and dtypes."""

from __future__ import annotations

import pytest
import torch

from fastseg.transforms import ElasticDeformation


def _coords(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return ys, xs


def test_image_and_mask_share_one_field():
    # The image holds each pixel's own (y, x) coordinates and the mask its flat index y·W + x. The warped
    # mask must name exactly the nearest pixel to p + field(p) for the field drawn with the same seed,
    # and the warped image (bicubic, A = -0.75: linear ramps come out within ~0.05) that same position.
    h, w = 61, 47
    ys, xs = _coords(h, w)
    image = torch.stack([ys, xs])
    mask = (ys * w + xs).long()
    out, warped = ElasticDeformation(sigma=10.0, seed=3)(image, mask)
    field = ElasticDeformation(sigma=10.0, seed=3).sample_field(h, w, dtype=torch.float64)  # same draw
    src_y, src_x = ys + field[0], xs + field[1]
    inside = (src_y >= 1) & (src_y <= h - 2) & (src_x >= 1) & (src_x <= w - 2)
    assert inside.float().mean() > 0.5 and field.abs().max() > 3
    my, mx = torch.div(warped, w, rounding_mode="floor").double(), (warped % w).double()
    assert torch.equal(my[inside], src_y[inside].round()) and torch.equal(mx[inside], src_x[inside].round())
    torch.testing.assert_close(out[0][inside], src_y[inside], rtol=0, atol=0.06)
    torch.testing.assert_close(out[1][inside], src_x[inside], rtol=0, atol=0.06)


def test_image_that_encodes_its_mask_stays_aligned():
    # A smooth image and the mask "image > 0.5": after one deformation, thresholding the warped image
    # gives the warped mask except within a pixel of the boundary.
    g = torch.Generator().manual_seed(0)
    h, w = 80, 72
    ys, xs = _coords(h, w)
    image = (0.5 + 0.4 * torch.sin(ys / 7 + torch.rand((), generator=g) * 6) * torch.cos(xs / 9)).float()
    mask = image > 0.5
    deform = ElasticDeformation(seed=11)
    out, warped = deform(image[None], mask[None])
    assert out.shape == (1, h, w) and warped.shape == (1, h, w) and warped.dtype == torch.bool
    agree = (out > 0.5) == warped
    far = (out - 0.5).abs() > 0.06  # the image changes by at most ~0.06 per pixel
    assert agree[far].all()
    assert agree.float().mean() > 0.9
    assert (warped != mask[None]).float().mean() > 0.02  # it did deform
    other, _ = ElasticDeformation(seed=12)(image[None], mask[None])  # a different field misaligns
    assert ((other > 0.5) == warped).float().mean() < agree.float().mean() - 0.02


def test_zero_sigma_is_identity():
    image, mask = torch.rand(3, 33, 29), torch.randint(0, 5, (33, 29))
    out, warped = ElasticDeformation(sigma=0.0, seed=0)(image, mask)
    torch.testing.assert_close(out, image, rtol=0, atol=1e-5)
    assert torch.equal(warped, mask)


def test_field_law():
    deform = ElasticDeformation(sigma=10.0, grid=3, seed=0)
    # align_corners: the coarse points sit on the corners and the centre, so the dense field there is
    # the Gaussian draw itself
    corners = torch.stack([deform.sample_field(41, 57, dtype=torch.float64)[:, [0, 0, 20, -1], [0, -1, 28, -1]]
                           for _ in range(400)])
    assert abs(corners.std().item() - 10.0) < 0.6 and abs(corners.mean().item()) < 0.6
    f = ElasticDeformation(sigma=10.0, seed=1).sample_field(64, 64, dtype=torch.float64)
    assert f.shape == (2, 64, 64) and f.diff(dim=-1).abs().max() < 2.0  # smooth: bicubic from a 3×3 grid
    assert ElasticDeformation(grid=5, seed=0).sample_field(20, 30).shape == (2, 20, 30)


def test_determinism_with_seed_and_generator():
    image, mask = torch.rand(2, 40, 50), torch.randint(0, 3, (1, 40, 50))
    a, b = ElasticDeformation(seed=7), ElasticDeformation(seed=7)
    first_a, first_b = a(image, mask), b(image, mask)
    assert torch.equal(first_a[0], first_b[0]) and torch.equal(first_a[1], first_b[1])
    second_a = a(image, mask)
    assert not torch.equal(second_a[0], first_a[0])  # a run of calls, not one fixed field
    assert torch.equal(second_a[0], b(image, mask)[0])
    assert not torch.equal(ElasticDeformation(seed=8)(image), first_a[0])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(ElasticDeformation(generator=g1)(image), ElasticDeformation(generator=g2)(image))


def test_probability_and_dtypes():
    image, mask = torch.randint(0, 256, (3, 30, 20), dtype=torch.uint8), torch.randint(0, 4, (30, 20))
    out, warped = ElasticDeformation(p=0.0, seed=0)(image, mask)
    assert out is image and warped is mask
    out, warped = ElasticDeformation(seed=0)(image, mask)
    assert out.dtype == torch.uint8 and out.shape == image.shape and warped.dtype == torch.int64
    assert set(warped.unique().tolist()) <= set(mask.unique().tolist())  # nearest: no new labels
    applied = [not torch.equal(ElasticDeformation(p=0.5, seed=s)(image), image) for s in range(40)]
    assert 8 <= sum(applied) <= 32
    grey = torch.rand(25, 35, dtype=torch.float64)
    assert ElasticDeformation(seed=0)(grey).shape == (25, 35)
    one = ElasticDeformation(seed=0)(torch.rand(1, 1, 9), torch.ones(1, 9, dtype=torch.bool))
    assert one[0].shape == (1, 1, 9) and one[1].all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        ElasticDeformation(sigma=-1)
    with pytest.raises(ValueError, match="grid"):
        ElasticDeformation(grid=1)
    with pytest.raises(ValueError, match="p must"):
        ElasticDeformation(p=1.5)
    with pytest.raises(ValueError, match="seed or generator"):
        ElasticDeformation(seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="padding_mode"):
        ElasticDeformation(padding_mode="wrap")
    deform = ElasticDeformation(seed=0)
    with pytest.raises(ValueError, match="image"):
        deform(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="mask"):
        deform(torch.rand(1, 8, 8), torch.zeros(8, 9))
    with pytest.raises(ValueError, match="mask"):
        deform(torch.rand(1, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="field"):
        ElasticDeformation.apply(torch.rand(1, 8, 8), torch.zeros(2, 8, 7))
