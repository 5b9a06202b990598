import numpy as np
import pytest

from hsissl.data.stats import BandStats
from hsissl.data.tiling import cut_tiles, tile_positions, untile


@pytest.mark.parametrize(
    "size, tile, stride", [(512, 64, 64), (128, 64, 32), (100, 64, 64), (70, 64, 48)]
)
def test_tiles_round_trip_bit_exact(size, tile, stride):
    rng = np.random.default_rng(size)
    scene = rng.integers(-32768, 32767, size=(32, size, size + 3), dtype=np.int16)
    positions = tile_positions(size, size + 3, tile, stride)
    tiles = cut_tiles(scene, positions, tile)
    assert tiles.shape == (len(positions), 32, tile, tile)
    assert np.array_equal(untile(tiles, positions, size, size + 3), scene)


def test_positions_of_the_paper_grid():
    positions = tile_positions(512, 512, 64, 64)
    assert len(positions) == 64 and positions[0] == (0, 0) and positions[-1] == (448, 448)


def test_scene_smaller_than_a_tile_is_an_error():
    with pytest.raises(ValueError, match="smaller than one 64x64 tile"):
        tile_positions(50, 80, 64, 64)


def test_untile_detects_gaps():
    with pytest.raises(ValueError, match="cover only"):
        untile(np.zeros((1, 4, 4)), [(0, 0)], 8, 8)


def test_band_stats_match_numpy_over_the_whole_split():
    rng = np.random.default_rng(0)
    scenes = [rng.integers(-200, 32767, size=(32, 96, 96), dtype=np.int16) for _ in range(5)]
    stats = BandStats(32)
    for scene in scenes:
        stats.update(scene[None])  # streamed one scene at a time
    everything = np.concatenate([s.reshape(32, -1) for s in scenes], axis=1).astype(np.float64)
    np.testing.assert_allclose(stats.mean(), everything.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats.std(), everything.std(axis=1), rtol=1e-9)
    assert stats.count == 5 * 96 * 96


def test_band_stats_are_exact_where_float_sums_are_not():
    # Large offset, tiny variance: naive float32 sum-of-squares loses the variance entirely.
    scene = np.full((1, 1, 1000, 1000), 30000, dtype=np.int16)
    scene[..., ::2, :] += 1
    stats = BandStats(1)
    stats.update(scene)
    assert stats.mean() == [30000.5]
    assert stats.std() == [0.5]


def test_band_stats_reject_floats_and_empty():
    stats = BandStats(2)
    with pytest.raises(TypeError, match="integer pixels"):
        stats.update(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="no pixels"):
        stats.mean()
