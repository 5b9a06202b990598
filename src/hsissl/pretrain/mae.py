"""MAE pretraining (He et al. 2022): reconstruct 75 % masked patches of 32-band tiles."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hsissl.config import Config, ConfigError
from hsissl.data.augment import MAEAugment
from hsissl.models import MODELS, create_model
from hsissl.pretrain.recipe import Recipe

DEFAULT_MODEL = "mae_vit_base_patch8_64"  # the factory when mae.model is ""


class MAERecipe(Recipe):
    method = "mae"
    static_shapes = True  # fixed tile, fixed mask ratio: one graph for the whole run

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        mc = cfg.mae
        self.factory = mc.model or DEFAULT_MODEL
        known = [name for name in MODELS if name.startswith("mae_")]  # MaskedAutoencoderViTs
        if self.factory not in known:
            raise ConfigError(f"mae.model={self.factory!r} is not an MAE model factory; "
                              f"expected one of {known}")  # fmt: skip
        self.kwargs = {"norm_pix_loss": mc.norm_pix_loss}  # what build() records
        # Dropout only while pretraining: the saved encoder is rebuilt without it.
        self.model = create_model(self.factory, **self.kwargs, drop_rate=mc.drop_rate)
        self.augment = MAEAugment(size=cfg.data.tile_size, scale=tuple(mc.crop_scale))
        self.mask_ratio = mc.mask_ratio

    def forward(
        self, images: torch.Tensor, step: int, total: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.augment(images)  # (B, C, T, T)
        loss, _, mask = self.model(x, self.mask_ratio)
        return loss, {"loss_mae": loss.detach(), "mask_ratio": mask.detach().float().mean()}

    def compile_networks(self, **options: Any) -> None:
        """Compile the MAE model (encoder, decoder, loss: one full graph at static shapes); the
        augmentation before it stays eager."""
        self.model.compile(**{"dynamic": False, **options})

    def encoder(self) -> nn.Module:
        return self.model.encoder

    def build(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": self.kwargs, "attr": "encoder"}
