"""Batched HSI augmentations: shapes, exact invariants, per-sample randomness, seeding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hsissl.data import augment as A


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(8, 32, 24, 24, generator=gen(42))  # (B, C, H, W), normalised-like


def test_random_resized_crop_full_box_is_the_identity(x):
    out = A.random_resized_crop(x, 24, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=gen())
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_random_resized_crop_shapes_boxes_and_per_sample_crops(x):
    assert A.random_resized_crop(x, 16, generator=gen()).shape == (8, 32, 16, 16)
    assert A.random_resized_crop(x, (12, 20), generator=gen()).shape == (8, 32, 12, 20)
    boxes = A.crop_boxes(500, 24, 24, (0.1, 0.5), (3 / 4, 4 / 3), gen())
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 24).all() and (boxes[:, 3] <= 24).all()
    area = w * h / 24**2
    assert area.min() >= 0.07 and area.max() <= 0.56  # scale range, give or take rounding
    assert (w / h).min() >= 0.6 and (w / h).max() <= 1.67
    assert len({tuple(b) for b in boxes.tolist()}) > 100  # every sample gets its own box
    # A box resampled at its own size is an exact crop.
    box = torch.tensor([[3.0, 5.0, 19.0, 15.0]]).expand(8, 4)
    torch.testing.assert_close(A.resample(x, box, (10, 16)), x[:, :, 5:15, 3:19], atol=1e-5, rtol=0)


def test_random_resized_crop_shrinking_averages_instead_of_aliasing(x):
    whole = torch.tensor([[0.0, 0.0, 24.0, 24.0]]).expand(8, 4)
    torch.testing.assert_close(A.resample(x, whole, 12), F.avg_pool2d(x, 2), atol=1e-5, rtol=0)


def test_flip_is_an_involution_and_rotations_are_dihedral(x):
    once = A.random_flip(x, generator=gen(3))
    assert not torch.equal(once, x)  # some samples were flipped ...
    torch.testing.assert_close(A.random_flip(once, generator=gen(3)), x, atol=0, rtol=0)
    rotated = A.random_flip(x, rotate90=True, generator=gen(4))
    kinds = []
    for i in range(8):
        candidates = [x[i].rot90(k, (-2, -1)) for k in range(4)]
        candidates += [c.flip(-1) for c in candidates]
        matches = [j for j, c in enumerate(candidates) if torch.equal(rotated[i], c)]
        assert matches, f"sample {i} is not a flip/rotation of its input"
        kinds.append(matches[0])
    assert len(set(kinds)) > 2  # per-sample choices, not one for the batch
    with pytest.raises(ValueError, match="square"):
        A.random_flip(x[:, :, :, :20], rotate90=True)


def test_brightness_contrast_is_one_affine_per_sample_for_all_bands(x):
    out = A.brightness_contrast(x, p=1.0, generator=gen(5))
    slopes = []
    for i in range(8):
        # Least squares out = a*x + b over all bands and pixels of the sample at once: if the
        # bands had different (a, b), the residual would not vanish.
        design = torch.stack([x[i].flatten(), torch.ones(x[i].numel())], dim=1)
        coef = torch.linalg.lstsq(design, out[i].flatten()[:, None]).solution[:, 0]
        assert (design @ coef - out[i].flatten()).abs().max() < 1e-4
        assert 0.6 - 1e-4 <= coef[0] <= 1.4 + 1e-4
        slopes.append(coef[0].item())
    assert max(slopes) - min(slopes) > 0.05  # factors drawn per sample
    torch.testing.assert_close(A.brightness_contrast(x, p=0.0), x)


def test_solarize_leaves_values_below_the_threshold_unchanged(x):
    out = A.solarize(x, threshold=0.3, p=1.0, generator=gen())
    below = x <= 0.3
    assert torch.equal(out[below], x[below])
    torch.testing.assert_close(out[~below], 0.6 - x[~below])
    assert (out <= 0.3).all()
    assert torch.equal(A.solarize(x, p=0.0), x)
    some = A.solarize(x, p=0.5, generator=gen(1))
    changed = [not torch.equal(some[i], x[i]) for i in range(8)]
    assert any(changed) and not all(changed)  # per-sample coin


def test_gaussian_blur_keeps_constants_and_matches_a_reflect_padded_conv(x):
    constant = torch.arange(8.0)[:, None, None, None].expand(8, 32, 24, 24).contiguous()
    out = A.gaussian_blur(constant, p=1.0, generator=gen())
    torch.testing.assert_close(out, constant, atol=1e-5, rtol=0)

    sigma, radius = 1.3, 4  # kernels are cut at 3 sigma
    d = torch.arange(-radius, radius + 1.0)
    k = torch.exp(-0.5 * (d / sigma) ** 2)
    k = (k / k.sum()).repeat(8 * 32, 1)  # (B*C, K)
    ref = F.pad(x.reshape(1, -1, 24, 24), (0, 0, radius, radius), mode="reflect")
    ref = F.conv2d(ref, k[:, None, :, None], groups=8 * 32)
    ref = F.pad(ref, (radius, radius, 0, 0), mode="reflect")
    ref = F.conv2d(ref, k[:, None, None, :], groups=8 * 32).reshape(x.shape)
    out = A.gaussian_blur(x, sigma=(sigma, sigma), p=1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

    torch.testing.assert_close(A.gaussian_blur(x, p=0.0), x, atol=1e-6, rtol=0)
    same_bands = x[:, :1].expand(8, 32, 24, 24)
    blurred = A.gaussian_blur(same_bands, p=1.0, generator=gen(2))
    assert torch.equal(blurred, blurred[:, :1].expand_as(blurred))  # one kernel for all bands


def test_multicrop_and_mae_shapes_and_seeding():
    x = torch.randn(4, 32, 64, 64, generator=gen(1))
    crop = A.MultiCrop(global_size=64, local_size=32, n_local=3)
    globals_, locals_ = crop(x, gen(7))
    assert [tuple(g.shape) for g in globals_] == [(4, 32, 64, 64)] * 2
    assert [tuple(v.shape) for v in locals_] == [(4, 32, 32, 32)] * 3
    again, _ = crop(x, gen(7))
    assert all(torch.equal(a, b) for a, b in zip(globals_, again, strict=True))
    other, _ = crop(x, gen(8))
    assert not torch.equal(other[0], globals_[0])
    assert not torch.equal(globals_[0], globals_[1])
    assert A.MAEAugment(size=48)(x, gen()).shape == (4, 32, 48, 48)


def test_integer_tiles_are_refused():
    with pytest.raises(TypeError, match="normalised float"):
        A.random_flip(torch.zeros(2, 32, 8, 8, dtype=torch.int16))
