"""Stage: pretrain a DINOv2 ViT-B/8 (DINO + iBOT + KoLeo); writes the teacher encoder record."""

from __future__ import annotations

from hsissl.config import Config
from hsissl.pretrain.dinov2 import DINOv2Recipe
from hsissl.pretrain.trainer import pretrain
from hsissl.stages.results import PretrainResult


def run(cfg: Config) -> PretrainResult:
    return PretrainResult(**pretrain(cfg, DINOv2Recipe, stage="pretrain-dinov2"))
