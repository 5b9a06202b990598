"""Stage: pretrain a Spatial-Spectral ViT-B/8 with DINOv2 on both streams; writes the teacher
encoder record."""

from __future__ import annotations

from typing import Any

from hsissl.config import Config
from hsissl.pretrain.ssvit import SSViTRecipe
from hsissl.pretrain.trainer import pretrain


def run(cfg: Config) -> dict[str, Any]:
    return pretrain(cfg, SSViTRecipe, stage="pretrain-ssvit")
