"""Patch embedding as one matrix product over unfolded patches.

timm's ``PatchEmbed`` runs a strided convolution. With kernel = stride = patch size that is one
matrix product, but cuDNN picks slow kernels for it at these shapes (32 input bands, 8x8
patches): on an H200 its forward and weight gradient took ~13 % of an MAE step
(../shared/perf/2026-12-04-h200-mae-b512-networks.txt). Unfolding the patches (one copy of the
input) and multiplying by the reshaped convolution weight gives the same numbers with a plain
GEMM. The parameters stay the convolution's (``proj.weight`` (D, C, p, p), ``proj.bias``), so
``state_dict`` keys and shapes, initialisation and old checkpoints are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Format, PatchEmbed


def unfold_patches(x: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p, W/q, C*p*q), each patch in the (channel, row, col) order of a
    flattened convolution weight (D, C, p, q)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // q, q)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // q, C * p * q)


class MatmulPatchEmbed(PatchEmbed):
    """Drop-in ``timm.layers.PatchEmbed`` (same arguments, checks, output formats and parameters)
    whose projection is ``F.linear`` over unfolded patches instead of ``Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, q = self.patch_size
        if self.img_size is not None and self.strict_img_size:
            if (H, W) != tuple(self.img_size):
                raise ValueError(f"input {H}x{W} does not match the model's {self.img_size}")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (q - W % q) % q, 0, (p - H % p) % p))
        elif H % p or W % q:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {p}x{q}")
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (D, C*p*q)
        x = F.linear(unfold_patches(x, p, q), weight, self.proj.bias)  # (B, h, w, D)
        if self.flatten or self.output_fmt == Format.NLC:
            x = x.flatten(1, 2)  # (B, L, D)
        elif self.output_fmt == Format.NCHW:
            x = x.permute(0, 3, 1, 2)  # (B, D, h, w)
        elif self.output_fmt == Format.NCL:
            x = x.permute(0, 3, 1, 2).flatten(2)  # (B, D, L)
        return self.norm(x)


class SpectralStemPatchEmbed(MatmulPatchEmbed):
    """A per-pixel spectral stem in front of the patch embedding (``spectral_stem`` filters).

    Each pixel's spectrum (C bands) goes through one 1D convolution over wavelength (kernel 5,
    shared by every band position, so a feature shifted by a band is the same feature), a GELU
    and a pairwise mean over neighbouring bands: (B, C, H, W) -> (B, filters * C / 2, H, W),
    then :class:`MatmulPatchEmbed`. The spectral front end of SpectralEarth's small-patch ViTs.
    """

    KERNEL = 5

    def __init__(self, *args, in_chans: int = 32, spectral_stem: int = 4, **kwargs) -> None:
        if in_chans % 2:
            raise ValueError(
                f"the spectral stem pools band pairs: in_chans {in_chans} must be even"
            )
        super().__init__(*args, in_chans=spectral_stem * in_chans // 2, **kwargs)
        self.stem = torch.nn.Conv1d(1, spectral_stem, self.KERNEL, padding=self.KERNEL // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        spectra = x.permute(0, 2, 3, 1).reshape(B * H * W, 1, C)  # (BHW, 1, C)
        feats = F.avg_pool1d(F.gelu(self.stem(spectra)), 2)  # (BHW, filters, C/2)
        return super().forward(
            feats.reshape(B, H, W, -1).permute(0, 3, 1, 2)
        )  # (B, filters*C/2, H, W)
