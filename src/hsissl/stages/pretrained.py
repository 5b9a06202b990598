"""A pretraining that ran in other processes (torchrun, a multi-node job) as its stage result."""

from __future__ import annotations

import json
import logging

from hsissl.config import Config
from hsissl.layout import ENCODER, HISTORY, checkpoint_key, storage_of
from hsissl.stages.results import PretrainResult

log = logging.getLogger(__name__)


def encoder_uri(cfg: Config) -> str:
    """Where the pretraining ``pretrain.name`` writes its encoder record."""
    return storage_of(cfg).join(checkpoint_key(cfg.pretrain.name, ENCODER))


def stored_result(cfg: Config, resumed: bool) -> PretrainResult:
    """What the pretraining left in the store, as ``hsissl.stages.pretrain_*.run`` returns it:
    the encoder URI, the steps and the last logged metrics from ``history.json`` (the final
    k-NN probe is only in its MLflow run)."""
    store = storage_of(cfg)
    encoder, history_key = (checkpoint_key(cfg.pretrain.name, f) for f in (ENCODER, HISTORY))
    if not store.exists(encoder):
        raise FileNotFoundError(
            f"{store.join(encoder)} does not exist: the pretraining finished "
            "without writing its encoder record (expected from hsissl.pretrain.trainer)"
        )
    history = []
    if store.exists(history_key):
        history = json.loads(store.get_bytes(history_key))
    else:
        log.warning("%s missing: no training metrics", store.join(history_key))
    last = dict(history[-1]) if history else {}
    steps = int(last.pop("step", 0))
    return PretrainResult(store.join(encoder), steps=steps, metrics=last, resumed=resumed)
