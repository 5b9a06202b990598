"""Stage: pretrain an MAE ViT-B/8 on the training tiles; writes the encoder record."""

from __future__ import annotations

from typing import Any

from hsissl.config import Config
from hsissl.pretrain.mae import MAERecipe
from hsissl.pretrain.trainer import pretrain


def run(cfg: Config) -> dict[str, Any]:
    return pretrain(cfg, MAERecipe, stage="pretrain-mae")
