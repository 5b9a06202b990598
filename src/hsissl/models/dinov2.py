"""DINOv2 ViT-B/8 backbone (registers, SwiGLU, LayerScale, iBOT mask token) and the DINO head.

Follows facebookresearch/dinov2 (`vision_transformer.py`, `layers/dino_head.py`) on timm blocks.
Parameter counts (docs/models.md): backbone 86,714,880, head 23,138,560, one network 109,853,440.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_
from torch.nn.utils.parametrizations import weight_norm

from hsissl.models.vit import HsiViT


class DinoVisionTransformer(HsiViT):
    """HsiViT plus a learnable `mask_token` (1, C) that replaces masked patch embeddings (iBOT)."""

    def __init__(
        self,
        reg_tokens: int = 4,
        ffn_layer: str = "swiglu",
        init_values: float | None = 1e-5,
        **kwargs,
    ) -> None:
        super().__init__(
            reg_tokens=reg_tokens, ffn_layer=ffn_layer, init_values=init_values, **kwargs
        )
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))

    def _apply_mask(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """x (B, h, w, C) patch embeddings; masks (B, h*w) bool, True = replace by mask_token."""
        B, h, w, C = x.shape
        if masks.shape != (B, h * w) or masks.dtype != torch.bool:
            raise ValueError(
                f"masks must be a bool tensor of shape {(B, h * w)}, "
                f"got {masks.dtype} {tuple(masks.shape)}"
            )
        token = self.mask_token.to(x.dtype).view(1, 1, 1, C)
        return torch.where(masks.view(B, h, w, 1), token, x)


def dinov2_vit_base_patch8_64(**kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-B/8 for 64x64x32 tiles: 4 registers, SwiGLU (hidden 2048), LayerScale 1e-5."""
    cfg = dict(patch_size=8, img_size=64, in_chans=32, embed_dim=768, depth=12, num_heads=12)
    return DinoVisionTransformer(**{**cfg, **kwargs})


def dinov2_vit_tiny_patch8_64(**kwargs) -> DinoVisionTransformer:
    """Test-sized DINOv2 ViT/8: depth 4, 4 heads, dim 64, 4 registers."""
    cfg = dict(patch_size=8, img_size=64, in_chans=32, embed_dim=64, depth=4, num_heads=4)
    return DinoVisionTransformer(**{**cfg, **kwargs})


def dinov2_vit_tiny_patch4_64(**kwargs) -> DinoVisionTransformer:
    """The tiny DINOv2 at patch 4 (16x16 maps per 64-px tile), as MAE's real-scene preset
    (issue 18's resolution lever, docs/real-data.md)."""
    return dinov2_vit_tiny_patch8_64(**{"patch_size": 4, **kwargs})


class DINOHead(nn.Module):
    """MLP (GELU) to a bottleneck, L2-normalise, weight-normalised prototype layer without bias.

    As dinov2's DINOHead with use_bn=False. The weight-norm magnitude g (out_dim, 1) is filled with
    1 and frozen (requires_grad=False), so the prototypes are unit vectors; it is still counted
    by `parameters()` (65,536 of the 23,138,560).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # g, (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> prototype scores (..., out_dim)."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(x, dim=-1, p=2, eps=eps))


def dino_head(
    in_dim: int,
    out_dim: int = 65536,
    hidden: int = 2048,
    bottleneck: int = 256,
    nlayers: int = 3,
) -> DINOHead:
    """DINO/iBOT head as configured in the dissertation (65,536 prototypes, bottleneck 256)."""
    return DINOHead(in_dim, out_dim, hidden_dim=hidden, bottleneck_dim=bottleneck, nlayers=nlayers)
