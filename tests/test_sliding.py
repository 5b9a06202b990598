"""Sliding-window inference: pointwise models stitch to the whole-scene answer, overlaps average."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsissl.data.tiling import tile_positions
from hsissl.segment.sliding import importance_map, predict_labels, predict_scene

C, K = 3, 8


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, K, H, W): elementwise ops only, so every pixel depends on itself alone."""
    return torch.cat([x, x * x - 0.5, torch.tanh(x[:, :2])], dim=1)


def _scene(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SHAPES_AND_GRIDS = [
    (100, 130, 64, 64),  # not a multiple of the tile: last windows flush with the edge
    (100, 130, 64, 32),  # overlapping windows
    (100, 130, 64, 48),  # stride that divides neither side
    (96, 96, 32, 32),  # exact multiple, no overlap at all
]


@pytest.mark.parametrize(("h", "w", "tile", "stride"), SHAPES_AND_GRIDS)
def test_pointwise_model_stitches_bitwise_to_whole_scene(
    h: int, w: int, tile: int, stride: int
) -> None:
    image = _scene(2, C, h, w)
    stitched = predict_scene(pointwise, image, tile=tile, stride=stride, num_classes=K)
    assert stitched.shape == (2, K, h, w)
    assert torch.equal(stitched, pointwise(image))


@pytest.mark.parametrize(("h", "w", "tile", "stride"), SHAPES_AND_GRIDS)
def test_one_by_one_conv_stitches_to_whole_scene(h: int, w: int, tile: int, stride: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C, K, kernel_size=1).eval()
    image = _scene(1, C, h, w, seed=1)
    stitched = predict_scene(conv, image, tile=tile, stride=stride, num_classes=K, batch_size=5)
    with torch.no_grad():
        whole = conv(image)
    torch.testing.assert_close(stitched, whole, rtol=0, atol=1e-6)


def test_non_pointwise_model_differs_at_window_borders_only() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C, K, kernel_size=3, padding=1).eval()
    image = _scene(1, C, 128, 128, seed=2)
    stitched = predict_scene(conv, image, tile=64, stride=64, num_classes=K)
    with torch.no_grad():
        whole = conv(image)
    diff = (stitched - whole).abs().amax(dim=(0, 1))  # (H, W)
    seam = torch.zeros(128, 128, dtype=torch.bool)  # rows/cols next to a window edge
    for edge in (0, 63, 64, 127):
        seam[edge, :] = True
        seam[:, edge] = True
    # Zero padding at a window edge inside the scene changes the seam pixels ...
    assert diff[63:65, 1:127].min() > 0 and diff[1:127, 63:65].min() > 0
    # ... and nothing else (the scene's own border is zero-padded in both).
    assert diff[~seam].max() <= 1e-6


def test_overlaps_are_averaged_not_overwritten() -> None:
    # Each window answers one constant: the mean of its own channel 0.
    def window_mean(x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 1, *x.shape[2:]).clone()

    h, w, tile, stride = 50, 70, 20, 8
    image = _scene(1, C, h, w, seed=3)
    got = predict_scene(window_mean, image, tile=tile, stride=stride, num_classes=1, batch_size=7,
                        blend="uniform")  # fmt: skip
    band = image[0, 0].double().numpy()
    total, count = np.zeros((h, w)), np.zeros((h, w))
    last = np.zeros((h, w))
    for y, x in tile_positions(h, w, tile, stride):
        value = band[y : y + tile, x : x + tile].mean()
        total[y : y + tile, x : x + tile] += value
        count[y : y + tile, x : x + tile] += 1
        last[y : y + tile, x : x + tile] = value
    expected = total / count
    assert count.max() > 1  # the grid really overlaps
    np.testing.assert_allclose(got[0, 0].double().numpy(), expected, rtol=0, atol=1e-5)
    assert np.abs(expected - last).max() > 1e-3  # "last window wins" would fail this test


def test_gaussian_blend_is_the_importance_weighted_mean() -> None:
    def window_mean(x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 1, *x.shape[2:]).clone()

    h, w, tile, stride = 50, 70, 20, 8
    image = _scene(1, C, h, w, seed=3)
    got = predict_scene(window_mean, image, tile=tile, stride=stride, num_classes=1, batch_size=7)
    band = image[0, 0].double().numpy()
    # sigma = tile / 8 around the window centre, written out independently of importance_map
    d = np.arange(tile) - (tile - 1) / 2
    g = np.exp(-(d**2) / (2 * (tile / 8) ** 2))
    weight = np.outer(g, g) / g.max() ** 2
    total, norm = np.zeros((h, w)), np.zeros((h, w))
    for y, x in tile_positions(h, w, tile, stride):
        total[y : y + tile, x : x + tile] += weight * band[y : y + tile, x : x + tile].mean()
        norm[y : y + tile, x : x + tile] += weight
    np.testing.assert_allclose(got[0, 0].double().numpy(), total / norm, rtol=0, atol=1e-5)
    uniform = predict_scene(window_mean, image, tile=tile, stride=stride, num_classes=1,
                            blend="uniform")  # fmt: skip
    assert (got - uniform).abs().max() > 1e-3  # the blends really differ


def test_importance_map_peaks_at_the_centre_and_stays_positive() -> None:
    m = importance_map(64)
    assert m.shape == (64, 64) and m.dtype == torch.float32
    assert m.max() == pytest.approx(1.0, abs=1e-3) and m[31:33, 31:33].min() == m.max()
    assert 0 < m.min() < 1e-6 and m.min() == m[0, 0]  # corners: tiny but never zero
    assert torch.equal(m, m.T) and torch.equal(m, m.flip(0))
    assert torch.equal(importance_map(8, "uniform"), torch.ones(8, 8))
    with pytest.raises(ValueError, match="blend='median'"):
        importance_map(8, "median")


def _window_relative(x: torch.Tensor) -> torch.Tensor:
    """A model whose answer depends on the window: the input minus the window's mean (as any
    normalisation over the window does). On a smooth scene it is smooth inside each window and
    steps wherever the window whose answer a pixel gets changes."""
    return x[:, :1] - x[:, :1].mean(dim=(2, 3), keepdim=True)


def _steps(logits: torch.Tensor, slope: float) -> tuple[float, float]:
    """Along a row: the largest jump between adjacent pixels and the largest change of that
    jump (a seam is a jump that its neighbours do not share), in units of the scene's slope."""
    row = logits[0, 0, 0].double()
    return float(row.diff().abs().max()) / slope, float(row.diff().diff().abs().max()) / slope


def test_no_seam_on_a_smooth_scene() -> None:
    h, w, tile = 64, 256, 64
    ramp = torch.linspace(0, 1, w).expand(1, 1, h, w).contiguous()
    slope = 1 / (w - 1)  # the scene changes by this much from one pixel to the next

    def steps(stride: int, blend: str = "gaussian") -> tuple[float, float]:
        got = predict_scene(_window_relative, ramp, tile=tile, stride=stride, num_classes=1,
                            blend=blend)  # fmt: skip
        return _steps(got, slope)

    # stride = tile (the old finetune default): a step of ~tile x slope at every window border
    assert steps(64, "uniform")[0] > 60
    # overlapping windows averaged uniformly still step where a window enters or leaves
    assert steps(16, "uniform")[0] > 10 and steps(32, "uniform")[0] > 20
    # Gaussian-weighted windows hand over smoothly: at evaluate-real's stride 16 no jump is
    # steeper than the scene itself; at the finetune default (32) the slope bends, never steps
    jump, bend = steps(16)
    assert jump < 1.01 and bend < 0.2
    jump, bend = steps(32)
    assert jump < 4 and bend < 1


def test_batching_and_scene_stacking_do_not_change_the_result() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C, K, kernel_size=3, padding=1).eval()
    image = _scene(2, C, 70, 90, seed=4)
    ref = predict_scene(conv, image, tile=32, stride=24, num_classes=K, batch_size=1000)
    for batch_size in (1, 7):
        got = predict_scene(conv, image, tile=32, stride=24, num_classes=K, batch_size=batch_size)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    single = predict_scene(conv, image[1], tile=32, stride=24, num_classes=K)  # (C, H, W) input
    assert single.shape == (1, K, 70, 90)
    torch.testing.assert_close(single[0], ref[1], rtol=0, atol=1e-6)


def test_predict_labels_is_argmax_of_whole_scene_logits() -> None:
    image = _scene(2, C, 100, 130, seed=5)
    labels = predict_labels(pointwise, image, tile=64, stride=32, num_classes=K)
    assert labels.shape == (2, 100, 130) and labels.dtype == torch.int64
    assert torch.equal(labels, pointwise(image).argmax(dim=1))


def test_bad_inputs_are_named() -> None:
    image = _scene(1, C, 64, 64)
    with pytest.raises(ValueError, match=r"expected \(4, 5, 32, 32\)"):
        predict_scene(pointwise, image, tile=32, stride=32, num_classes=5)
    with pytest.raises(ValueError, match="smaller than one"):
        predict_scene(pointwise, _scene(1, C, 40, 80), tile=64, stride=64, num_classes=K)
    with pytest.raises(ValueError, match="float tensor"):
        predict_scene(pointwise, torch.zeros(1, C, 64, 64, dtype=torch.int16), num_classes=K)
