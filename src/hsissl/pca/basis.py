"""PCA of normalised pixel spectra (32 bands -> a few components).

The dissertation's proof of concept reduced the 32 OHS bands to 3 with PCA and asked how
much of the spectrum can be recovered from them. :class:`PCA` is fitted in float64 by SVD
of the centred pixel matrix; components are sign-fixed (largest-magnitude loading
positive) so a refit on the same pixels gives the same basis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hsissl.data.normalize import Normalizer
from hsissl.data.shards import SplitView


@dataclass(frozen=True)
class PCA:
    """A fitted PCA basis: ``z = (x - mean) @ components.T``, ``x ~ z @ components + mean``."""

    mean: np.ndarray  # (C,) float64
    components: np.ndarray  # (K, C) float64, orthonormal rows, by decreasing variance
    explained_variance: np.ndarray  # (K,) variance of each component on the fit pixels
    total_variance: float  # summed variance of all C bands on the fit pixels

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """(K,) share of the total variance each component explains (sums to <= 1)."""
        return self.explained_variance / self.total_variance

    @property
    def bands(self) -> int:
        return int(self.components.shape[1])

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(N, C) spectra -> (N, K) component scores."""
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """(N, K) scores -> (N, C) reconstructed spectra."""
        return np.asarray(z, dtype=np.float64) @ self.components + self.mean

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (C,), components (K, C)) as float32 tensors for batched image transforms."""
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=device)
        comps = torch.as_tensor(self.components, dtype=torch.float32, device=device)
        return mean, comps

    def to_dict(self) -> dict[str, Any]:
        ratio = self.explained_variance_ratio
        return {
            "bands": self.bands,
            "components": self.components.tolist(),
            "mean": self.mean.tolist(),
            "explained_variance": self.explained_variance.tolist(),
            "explained_variance_ratio": ratio.tolist(),
            "cumulative_variance_ratio": np.cumsum(ratio).tolist(),
            "total_variance": self.total_variance,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "pca.json") -> PCA:
        try:
            pca = cls(
                mean=np.asarray(data["mean"], dtype=np.float64),
                components=np.asarray(data["components"], dtype=np.float64),
                explained_variance=np.asarray(data["explained_variance"], dtype=np.float64),
                total_variance=float(data["total_variance"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{origin}: not a PCA record ({exc})") from exc
        k, c = pca.components.shape if pca.components.ndim == 2 else (0, 0)
        if c != len(pca.mean) or k != len(pca.explained_variance):
            raise ValueError(
                f"{origin}: components {pca.components.shape}, mean {pca.mean.shape} and "
                f"explained_variance {pca.explained_variance.shape} do not fit (K, C), (C,), (K,)"
            )
        return pca


def fit_pca(pixels: np.ndarray, n_components: int) -> PCA:
    """Fit ``n_components`` axes to ``pixels`` (N, C) in float64 (SVD of the centred matrix)."""
    x = np.asarray(pixels, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"pixels must be (N, C), got shape {x.shape}")
    n, c = x.shape
    if not 1 <= n_components <= c:
        raise ValueError(f"pca.components must be in 1..{c} (the band count), got {n_components}")
    if n < 2:
        raise ValueError(f"need at least 2 pixels to fit a PCA, got {n}")
    mean = x.mean(axis=0)
    centred = x - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)  # s descending, vt (C, C)
    variance = s**2 / (n - 1)  # (C,) per-component variance
    comps = vt[:n_components]  # (K, C)
    # Sign fix: each axis points towards its largest-magnitude loading (SVD signs are arbitrary).
    signs = np.sign(comps[np.arange(n_components), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    total = float(centred.var(axis=0, ddof=1).sum())
    return PCA(mean, comps, variance[:n_components], total)


def sample_pixels(
    view: SplitView, normalizer: Normalizer, count: int, seed: int, per_tile: int = 256
) -> np.ndarray:
    """``count`` random normalised pixel spectra (count, C) float64 from the tiles of ``view``.

    Pixels come ``per_tile`` at a time from random tiles (read in chunks), so a 200k-pixel
    sample reads ~800 tiles instead of touching 200k tiles of the memory-mapped shards.
    """
    if count < 1 or len(view) == 0:
        raise ValueError(f"need count >= 1 and a non-empty split; got {count}, {len(view)} tiles")
    rng = np.random.default_rng(seed)
    n_tiles = min(len(view), -(-count // per_tile))
    tiles = np.sort(rng.choice(len(view), size=n_tiles, replace=False))
    owner = rng.integers(0, n_tiles, size=count)  # which sampled tile each pixel comes from
    out = np.empty((count, normalizer.bands), dtype=np.float64)
    for start in range(0, n_tiles, 64):
        chunk = tiles[start : start + 64]
        images, _ = view.get(chunk)  # (n, C, T, T) int16
        flat = normalizer(images).reshape(len(chunk), normalizer.bands, -1)  # (n, C, T*T)
        rows = np.nonzero((owner >= start) & (owner < start + len(chunk)))[0]
        where = rng.integers(0, flat.shape[-1], size=len(rows))
        out[rows] = flat[owner[rows] - start, :, where]
    return out


def project(images: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised images -> (B, K, H, W) PCA scores."""
    return torch.einsum("bchw,kc->bkhw", images - mean[:, None, None], comps)


def reconstruct(scores: torch.Tensor, mean: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) scores -> (B, C, H, W) linear PCA reconstruction."""
    return torch.einsum("bkhw,kc->bchw", scores, comps) + mean[:, None, None]
