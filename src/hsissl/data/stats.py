"""Exact per-band statistics in one streaming pass.

Pixels are 16-bit integers, so per-batch sums and sums of squares are computed exactly
in int64 (a batch of up to ~8e9 values per band cannot overflow) and accumulated as
Python integers; mean and variance are exact up to the final float64 division, whatever
the dataset size or the order of scenes. Partial sums can be computed on worker threads
(:func:`band_sums`) and merged in any order.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def band_sums(tiles: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(pixels per band, per-band sum, per-band sum of squares) of (N, C, H, W) or (C, H, W) integers."""
    if tiles.dtype.kind not in "iu" or tiles.dtype.itemsize > 2:
        raise TypeError(f"band statistics take 8/16-bit integer pixels, got {tiles.dtype}")
    if tiles.ndim == 3:
        tiles = tiles[None]
    sums = tiles.sum(axis=(0, 2, 3), dtype=np.int64)
    sumsq = np.einsum("nchw,nchw->c", tiles, tiles, dtype=np.int64)
    return tiles.shape[0] * tiles.shape[2] * tiles.shape[3], sums, sumsq


class BandStats:
    def __init__(self, bands: int):
        self.bands = bands
        self.count = 0
        self._sum = [0] * bands
        self._sumsq = [0] * bands

    def update(self, tiles: np.ndarray) -> None:
        """Add (N, C, H, W) or (C, H, W) integer pixels."""
        self.merge(*band_sums(tiles))

    def merge(self, count: int, sums: np.ndarray, sumsq: np.ndarray) -> None:
        if len(sums) != self.bands:
            raise ValueError(f"expected {self.bands} bands, got {len(sums)}")
        for c in range(self.bands):
            self._sum[c] += int(sums[c])
            self._sumsq[c] += int(sumsq[c])
        self.count += count

    def mean(self) -> list[float]:
        self._require_data()
        return [float(Fraction(s, self.count)) for s in self._sum]

    def std(self) -> list[float]:
        """Population standard deviation per band."""
        self._require_data()
        n = self.count
        var = [Fraction(n * q - s * s, n * n) for s, q in zip(self._sum, self._sumsq, strict=True)]
        return [float(v) ** 0.5 for v in var]

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("no pixels were added to the band statistics")
