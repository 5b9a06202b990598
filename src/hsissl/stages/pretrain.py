"""Stage ``pretrain-<method>``: pretrain a registered method (hsissl.methods) on the training
tiles with the shared trainer; writes its encoder record to ``checkpoints/<name>/``."""

from __future__ import annotations

from hsissl import methods
from hsissl.config import Config
from hsissl.pretrain.trainer import pretrain
from hsissl.stages.results import PretrainResult


def run(cfg: Config, method: str) -> PretrainResult:
    spec = methods.get(method)
    return PretrainResult(**pretrain(cfg, spec.recipe_class(), stage=spec.stage))
