"""Decoders from PCA component maps back to all bands: :class:`BandDecoder`, a small
convolutional decoder (e.g. 3 -> 32 bands) that refines the linear PCA inverse, and
:class:`ViTBandDecoder`, a ViT on the component maps with a linear patch decoder (as in the
dissertation)."""

from __future__ import annotations

import torch
from torch import nn

from hsissl.pca.basis import PCA, reconstruct


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
