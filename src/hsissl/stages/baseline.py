"""Stage baseline-deeplabv3plus: the supervised from-scratch baseline (dissertation run 10).

Trains DeepLabV3+ (ResNet-50 V1c, FCN auxiliary head) on whole training scenes reassembled
from the shards (or random crops, ``baseline.crop_size``), normalised with the dataset's own
Normalizer, then evaluates on ``baseline.eval_split`` at tile size (each tile on its own) and
on whole scenes, and writes ``results/<baseline.name>/{metrics.json, predictions.npz,
model.pt}`` to the artifact store, all or nothing.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from hsissl.config import Config
from hsissl.config_rules import check_splits
from hsissl.data.shards import ShardDataset
from hsissl.layout import METRICS, MODEL, PREDICTIONS, dataset_uri, result_key
from hsissl.pretrain.context import context_of
from hsissl.segment.baseline import (
    DeepLabV3PlusAux,
    SceneBatches,
    TrainSettings,
    evaluate_whole_scenes,
    model_record,
    train,
)
from hsissl.segment.finetune import evaluate_tiles
from hsissl.stages.results import BaselineResult
from hsissl.storage import Storage
from hsissl.tracking import stage_run

log = logging.getLogger(__name__)

STAGE = "baseline-deeplabv3plus"
TILE_BATCH = 64  # tiles per forward pass in the tile-size evaluation


def run(cfg: Config) -> BaselineResult:
    """Train and evaluate the baseline; returns name, results/model URIs, mIoUs and seconds."""
    bc, start = cfg.baseline, time.perf_counter()
    dataset = ShardDataset(dataset_uri(cfg))
    check_splits(dataset.splits, f"dataset {dataset.uri}", "baseline.eval_split", bc.eval_split)
    ctx = context_of(cfg)
    normalizer = dataset.normalizer  # from scratch: the data's own statistics
    batches = SceneBatches(dataset, "tr", bc.batch_size, bc.crop_size, seed=ctx.seed,
                           prefetch=max(1, ctx.loader_threads))  # fmt: skip
    steps = bc.max_steps or max(1, math.ceil(bc.epochs * batches.steps_per_epoch()))
    model = DeepLabV3PlusAux(bc.encoder, normalizer.bands).to(ctx.device)
    settings = TrainSettings(steps, bc.lr, bc.poly_power, bc.weight_decay, bc.aux_weight)
    with stage_run(cfg, STAGE) as tracker:
        tracker.set_tags({"method": "none", "head": "deeplabv3plus", "encoder": bc.encoder,
                          "normalizer": normalizer.fingerprint, "results": bc.name})  # fmt: skip
        tracker.name_after(bc.name)
        ctx = ctx.logging_to(tracker.log_metrics)
        history = train(model, normalizer, batches, settings, ctx)
        split = dataset.split(bc.eval_split)
        tile_result = evaluate_tiles(model, normalizer, split, ctx, TILE_BATCH).compute()
        scene_matrix, shown = evaluate_whole_scenes(model, normalizer, dataset, bc.eval_split,
                                                    ctx)  # fmt: skip
        scene_result = scene_matrix.compute()
        metrics = {
            "kind": "baseline", "name": bc.name,
            "encoder": {"uri": "", "method": "none", "factory": model.build["encoder"]},
            "head": "deeplabv3plus", "dataset": dataset.uri, "normalizer": normalizer.fingerprint,
            "tile": tile_result, "scene": scene_result, "scene_inference": "whole",
            "history": history, "config": asdict(bc), "seconds": time.perf_counter() - start,
        }  # fmt: skip
        record = model_record(model, normalizer, dataset, asdict(bc), steps)
        write_results(ctx.store, bc.name, metrics, shown, record)
        tracker.log_metrics(_summary("tile", tile_result) | _summary("scene", scene_result),
                            step=steps)  # fmt: skip
        tracker.log_dict(metrics, "metrics.json")
    log.info("%s: tile mIoU %s, scene mIoU %s (%.1f s)", bc.name, tile_result["miou"],
             scene_result["miou"], metrics["seconds"])  # fmt: skip
    return BaselineResult(bc.name, ctx.store.join(result_key(bc.name)),
                          ctx.store.join(result_key(bc.name, MODEL)), steps, tile_result["miou"],
                          scene_result["miou"], metrics["seconds"])  # fmt: skip


def _summary(prefix: str, result: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}_{k}": result[k] for k in ("miou", "macc", "oa") if result[k] is not None}


def write_results(store: Storage, name: str, metrics: dict[str, Any],
                  shown: dict[str, np.ndarray], record: dict[str, Any]) -> None:  # fmt: skip
    """predictions.npz, model.pt, then metrics.json (the commit marker): all or nothing."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **shown)
    with store.transaction(result_key(name)) as tx:
        tx.put_bytes(PREDICTIONS, buffer.getvalue())
        torch.save(record, tx.path(MODEL))
        tx.done(MODEL)
        tx.commit({METRICS: json.dumps(metrics, indent=1).encode()})
