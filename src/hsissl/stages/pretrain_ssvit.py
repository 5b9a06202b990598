"""Stage: pretrain a Spatial-Spectral ViT-B/8 with DINOv2 on both streams; writes the teacher
encoder record."""

from __future__ import annotations

from hsissl.config import Config
from hsissl.pretrain.ssvit import SSViTRecipe
from hsissl.pretrain.trainer import pretrain
from hsissl.stages.results import PretrainResult


def run(cfg: Config) -> PretrainResult:
    return PretrainResult(**pretrain(cfg, SSViTRecipe, stage="pretrain-ssvit"))
