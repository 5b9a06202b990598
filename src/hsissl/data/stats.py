"""Exact per-band statistics in one streaming pass.

Pixels are 16-bit integers, so per-batch sums and sums of squares are integers below
2**53 and float64 BLAS reductions of them are exact; they are accumulated as Python
integers, so mean and variance are exact up to the final float64 division, whatever
the dataset size or the order of scenes.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

# Per call at most 2**53 / 32767**2 ~ 8.4e6 values per band keep float64 sums exact.
_CHUNK = 8_000_000


class BandStats:
    def __init__(self, bands: int):
        self.bands = bands
        self.count = 0
        self._sum = [0] * bands
        self._sumsq = [0] * bands

    def update(self, tiles: np.ndarray) -> None:
        """Add (N, C, H, W) or (C, H, W) integer pixels."""
        if tiles.dtype.kind not in "iu" or tiles.dtype.itemsize > 2:
            raise TypeError(f"BandStats takes 8/16-bit integer pixels, got {tiles.dtype}")
        flat = np.moveaxis(tiles, -3, 0).reshape(self.bands, -1)  # (C, P)
        for start in range(0, flat.shape[1], _CHUNK):
            part = flat[:, start : start + _CHUNK].astype(np.float64)
            sums = part.sum(axis=1)
            sumsq = np.einsum("cp,cp->c", part, part)
            for c in range(self.bands):
                self._sum[c] += int(sums[c])
                self._sumsq[c] += int(sumsq[c])
        self.count += flat.shape[1]

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
