"""PCA of normalised pixel spectra (32 bands -> a few components) and the band decoder.

The dissertation's proof of concept reduced the 32 OHS bands to 3 with PCA and asked how
much of the spectrum can be recovered from them. :class:`PCA` is fitted in float64 by SVD
of the centred pixel matrix; components are sign-fixed (largest-magnitude loading
positive) so a refit on the same pixels gives the same basis. :class:`BandDecoder` is a
small convolutional decoder 3 -> 32 bands that refines the linear PCA inverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

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


class BandDecoder(nn.Module):
    """3 PCA bands -> 32 bands: the linear PCA inverse plus a learned convolutional residual.

    The last convolution starts at zero, so before training the decoder *is* the PCA inverse;
    training can only lower its error by using spatial context and non-linear band relations.
    """

    def __init__(self, pca: PCA, hidden: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError(f"BandDecoder needs >= 2 conv layers, got {layers}")
        mean, comps = pca.tensors()
        self.register_buffer("mean", mean)  # (C,)
        self.register_buffer("comps", comps)  # (K, C)
        widths = [pca.n_components] + [hidden] * (layers - 1)
        body: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            body += [nn.Conv2d(a, b, 3, padding=1), nn.GELU()]
        last = nn.Conv2d(hidden, pca.bands, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*body, last)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) PCA scores -> (B, C, H, W) normalised bands."""
        return reconstruct(scores, self.mean, self.comps) + self.body(scores)


class ViTBandDecoder(nn.Module):
    """3 PCA bands -> 32 bands through a 3-channel ViT: the dissertation's proof of concept.

    The ViT (``in_chans`` = number of components) encodes the PCA image; a linear layer maps
    each patch token back to the patch's pixels in every band, added as a residual to the
    linear PCA inverse (zero-initialised, so training starts from the PCA inverse).
    """

    def __init__(self, pca: PCA, factory: str = "vit_tiny_patch8_64") -> None:
        super().__init__()
        from hsissl.models import create_model

        mean, comps = pca.tensors()
        self.register_buffer("mean", mean)  # (C,)
        self.register_buffer("comps", comps)  # (K, C)
        self.vit = create_model(factory, in_chans=pca.n_components)
        self.patch = self.vit.patch_size
        self.bands = pca.bands
        self.to_pixels = nn.Linear(self.vit.embed_dim, self.patch * self.patch * pca.bands)
        nn.init.zeros_(self.to_pixels.weight)
        nn.init.zeros_(self.to_pixels.bias)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) PCA scores -> (B, C, H, W) normalised bands."""
        b, _, h, w = scores.shape
        p, c = self.patch, self.bands
        tokens = self.vit.forward_features(scores)[:, self.vit.num_prefix_tokens :]  # (B, L, D)
        pixels = self.to_pixels(tokens).reshape(b, h // p, w // p, p, p, c)  # (B, h, w, p, p, C)
        residual = pixels.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return reconstruct(scores, self.mean, self.comps) + residual


def make_decoder(kind: str, pca: PCA, vit_model: str = "vit_tiny_patch8_64") -> nn.Module:
    """``conv`` (BandDecoder) or ``vit`` (ViTBandDecoder)."""
    if kind == "conv":
        return BandDecoder(pca)
    if kind == "vit":
        return ViTBandDecoder(pca, vit_model)
    raise ValueError(f"pca.decoder: found {kind!r}, expected 'conv' or 'vit'")
