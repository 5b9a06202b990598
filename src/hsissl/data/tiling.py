"""Cutting scenes into square tiles and putting them back together."""

from __future__ import annotations

import numpy as np


def tile_positions(height: int, width: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of a tile grid that covers the whole scene.

    Rows/columns start every ``stride`` pixels; when the scene side is not a multiple of
    the stride, one last tile is aligned to the far edge so no pixel is left out.
    """
    if tile <= 0 or stride <= 0:
        raise ValueError(f"tile size and stride must be positive, got tile={tile}, stride={stride}")
    if height < tile or width < tile:
        raise ValueError(f"scene {height}x{width} is smaller than one {tile}x{tile} tile")
    return [(y, x) for y in _starts(height, tile, stride) for x in _starts(width, tile, stride)]


def _starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def cut_tiles(array: np.ndarray, positions: list[tuple[int, int]], tile: int) -> np.ndarray:
    """(..., H, W) -> (N, ..., T, T), one copy."""
    height, width = array.shape[-2:]
    if (
        height % tile == 0
        and width % tile == 0
        and positions == tile_positions(height, width, tile, tile)
    ):
        # Non-overlapping full grid: one strided copy instead of a loop.
        ny, nx, lead = height // tile, width // tile, array.shape[:-2]
        grid = array.reshape(*lead, ny, tile, nx, tile)
        k = len(lead)
        order = (k, k + 2, *range(k), k + 1, k + 3)  # (ny, nx, ..., T, T)
        return np.ascontiguousarray(grid.transpose(order)).reshape(ny * nx, *lead, tile, tile)
    out = np.empty((len(positions), *array.shape[:-2], tile, tile), dtype=array.dtype)
    for i, (y, x) in enumerate(positions):
        out[i] = array[..., y : y + tile, x : x + tile]
    return out


def untile(
    tiles: np.ndarray, positions: list[tuple[int, int]], height: int, width: int
) -> np.ndarray:
    """Inverse of :func:`cut_tiles`: (N, ..., T, T) -> (..., H, W); later tiles win on overlap."""
    tile = tiles.shape[-1]
    out = np.zeros((*tiles.shape[1:-2], height, width), dtype=tiles.dtype)
    covered = np.zeros((height, width), dtype=bool)
    for t, (y, x) in zip(tiles, positions, strict=True):
        out[..., y : y + tile, x : x + tile] = t
        covered[y : y + tile, x : x + tile] = True
    if not covered.all():
        raise ValueError(f"tiles cover only {covered.sum()} of {height * width} pixels")
    return out
