"""Backbones for 64x64x32 hyperspectral tiles (timm conventions), created by name.

>>> model = create_model("dinov2_vit_tiny_patch8_64")
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hsissl.models.dinov2 import (
    DINOHead,
    DinoVisionTransformer,
    dino_head,
    dinov2_vit_base_patch8_64,
    dinov2_vit_tiny_patch4_64,
    dinov2_vit_tiny_patch8_64,
)
from hsissl.models.mae import (
    MaskedAutoencoderViT,
    mae_vit_base_patch8_64,
    mae_vit_tiny_patch4_64,
    mae_vit_tiny_patch4_stem_64,
    mae_vit_tiny_patch8_64,
    random_masking,
)
from hsissl.models.ssvit import SpatialSpectralViT, ssvit_base_patch8_64, ssvit_tiny_patch8_64
from hsissl.models.vit import HsiViT, vit_base_patch8_64, vit_tiny_patch8_64

MODELS: dict[str, Callable[..., nn.Module]] = {
    "vit_base_patch8_64": vit_base_patch8_64,
    "vit_tiny_patch8_64": vit_tiny_patch8_64,
    "mae_vit_base_patch8_64": mae_vit_base_patch8_64,
    "mae_vit_tiny_patch8_64": mae_vit_tiny_patch8_64,
    "mae_vit_tiny_patch4_64": mae_vit_tiny_patch4_64,
    "mae_vit_tiny_patch4_stem_64": mae_vit_tiny_patch4_stem_64,
    "dinov2_vit_base_patch8_64": dinov2_vit_base_patch8_64,
    "dinov2_vit_tiny_patch8_64": dinov2_vit_tiny_patch8_64,
    "dinov2_vit_tiny_patch4_64": dinov2_vit_tiny_patch4_64,
    "ssvit_base_patch8_64": ssvit_base_patch8_64,
    "ssvit_tiny_patch8_64": ssvit_tiny_patch8_64,
}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as `name` in MODELS, passing `kwargs` to its factory."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {sorted(MODELS)}") from None
    return factory(**kwargs)


__all__ = [
    "MODELS",
    "DINOHead",
    "DinoVisionTransformer",
    "HsiViT",
    "MaskedAutoencoderViT",
    "SpatialSpectralViT",
    "create_model",
    "dino_head",
    "random_masking",
    *MODELS,
]
