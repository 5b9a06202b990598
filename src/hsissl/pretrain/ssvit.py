"""SS-ViT pretraining: the DINOv2 recipe applied to both streams of the Spatial-Spectral ViT.

Spatial stream: DINO on its CLS token and iBOT on block-masked 8x8 patches, as in DINOv2.
Spectral stream: DINO on its CLS token and iBOT on masked band-pair tokens: a share
``mask_probability`` of the global-crop images (drawn independently of the spatial masks) get
``round(spectral_mask_ratio * 16)`` of their 16 band-pair tokens replaced by the spectral
``mask_token``. One DINO head (student and teacher each) serves DINO and iBOT of both streams
(docs/models.md); each stream keeps its own loss modules (and centering state).

loss = spatial_weight * (DINO + iBOT + KoLeo of the spatial stream)
     + spectral_weight * (DINO + iBOT + KoLeo of the spectral stream), each term weighted as in
DINOv2. The backbone only takes the crop sizes it has projections for (64 and 32), so
``data.tile_size`` and ``ssvit.local_size`` must be among them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from hsissl.config import Config, ConfigError
from hsissl.pretrain.dinov2 import DINOv2Recipe, Masks, mask_counts, random_masks


class SSViTRecipe(DINOv2Recipe):
    """DINOv2 on ``SpatialSpectralViT`` (``cfg.ssvit``); ``embed()`` uses the spatial stream."""

    method = "ssvit"
    default_model = "ssvit_base_patch8_64"
    streams: ClassVar[tuple[tuple[str, str | None, str], ...]] = (
        ("spatial", "spatial_weight", "_spatial"),
        ("spectral", "spectral_weight", "_spectral"),
    )

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        backbone = self.student["backbone"]
        sizes = getattr(backbone, "crop_sizes", None)
        if sizes is None or not hasattr(backbone, "spectral_embed"):
            raise ConfigError(f"ssvit.model={self.factory!r} is not a Spatial-Spectral ViT "
                             f"(use ssvit_base_patch8_64 or ssvit_tiny_patch8_64)")  # fmt: skip
        for key, size in (
            ("data.tile_size", cfg.data.tile_size),
            ("ssvit.local_size", self.dc.local_size),
        ):
            if size not in sizes:
                raise ValueError(f"{key}={size}: the SS-ViT only takes crops of {sizes} pixels")
        self.n_bands = backbone.spectral_embed.num_patches  # 16 band-pair tokens

    def draw_masks(self, n: int) -> Masks:
        """Spatial block masks as DINOv2, plus (n, 16) spectral masks with a fixed count."""
        masks = super().draw_masks(n)
        ratio = self.dc.spectral_mask_ratio
        counts = mask_counts(n, self.n_bands, (ratio, ratio), self.dc.mask_probability)
        masks["spectral"] = random_masks(counts, self.n_bands)
        return masks

    def features(self, backbone: nn.Module, x: torch.Tensor, masks: Masks | None = None
                 ) -> dict[str, torch.Tensor]:  # fmt: skip
        """{"spatial": (B, 69, C), "spectral": (B, 21, C)} (21 spatial tokens for 32x32 crops)."""
        masks = masks or {}
        return backbone.forward_features(x, masks=masks.get("spatial"),
                                         spectral_masks=masks.get("spectral"))  # fmt: skip
