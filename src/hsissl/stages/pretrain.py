"""Stage ``pretrain-<method>``: pretrain a registered method (hsissl.methods) on the training
tiles with the shared trainer; writes its encoder record to ``checkpoints/<name>/``."""

from __future__ import annotations

from typing import Any

from hsissl import methods
from hsissl.config import Config
from hsissl.pretrain.trainer import pretrain


def run(cfg: Config, method: str) -> dict[str, Any]:
    spec = methods.get(method)
    return pretrain(cfg, spec.recipe_class(), stage=spec.stage)
