"""Stage: pretrain an MAE ViT-B/8 on the training tiles; writes the encoder record."""

from __future__ import annotations

from hsissl.config import Config
from hsissl.pretrain.mae import MAERecipe
from hsissl.pretrain.trainer import pretrain
from hsissl.stages.results import PretrainResult


def run(cfg: Config) -> PretrainResult:
    return PretrainResult(**pretrain(cfg, MAERecipe, stage="pretrain-mae"))
