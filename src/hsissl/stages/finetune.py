"""Stage: a segmentation head on a frozen encoder (the dissertation's runs 1-9).

``hsissl finetune --config configs/finetune/run1.yaml finetune.encoder=<URI>`` (an encoder
record, ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` from the Model Registry, or
``random:<factory>``) trains
``finetune.head`` on the labelled training tiles, evaluates it at tile size and on whole scenes
of ``finetune.eval_split`` (sliding window) and writes ``results/<name>/metrics.json``,
``predictions.npz`` and ``head.pt`` to the artifact store, all or nothing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsissl import config_rules, registry
from hsissl.config import Config, ConfigError
from hsissl.config_rules import check_splits
from hsissl.data.shards import ShardDataset
from hsissl.layout import HEAD, METRICS, PREDICTIONS, dataset_uri, result_key
from hsissl.models import MODELS
from hsissl.pretrain.context import context_of
from hsissl.segment.finetune import (
    HEAD_FORMAT,
    RANDOM_PREFIX,
    SegmentationModel,
    build_head,
    class_weights,
    evaluate_scenes,
    evaluate_tiles,
    head_spec,
    make_loss,
    open_encoder,
    train_head,
)
from hsissl.stages.results import FinetuneResult
from hsissl.storage import Storage, open_storage
from hsissl.tracking import resolve_uri, stage_run

log = logging.getLogger(__name__)


def run(cfg: Config) -> FinetuneResult:
    """Train ``cfg.finetune.head`` on the frozen ``cfg.finetune.encoder``, evaluate, write results.

    Returns name, results_uri, head_uri, tile_miou, scene_miou and seconds.
    """
    ft, start = cfg.finetune, time.perf_counter()
    dataset = ShardDataset(dataset_uri(cfg))
    config_rules.require(cfg, "finetune")
    check_splits(dataset.splits, f"dataset {dataset.uri}", "finetune.eval_split", ft.eval_split)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a head on frozen features is light
        raise ConfigError(
            f"finetune runs on one device; got WORLD_SIZE={os.environ['WORLD_SIZE']} "
            "(start it without torchrun)"
        )
    # finetune never applied pretrain.deterministic: kept, so its runs stay what they were
    ctx = context_of(cfg, deterministic=False)
    store = ctx.store
    registered = None  # the Model Registry version a models:/ URI names
    encoder_uri = ft.encoder
    if encoder_uri.startswith(registry.SCHEME):
        registered = registry.resolve(encoder_uri, resolve_uri(cfg.tracking.uri, cfg.run_dir))
        encoder_uri = registered["source"]
    encoder, normalizer, enc_info = open_encoder(
        resolve_encoder(encoder_uri, store), dataset, cfg.seed
    )
    if registered is not None:
        registry.check_step(registered, enc_info.get("step"))
    name = ft.name or f"finetune-{enc_info['method']}-{ft.head}"
    tile = int(dataset.manifest["tile_size"])
    spec = head_spec(encoder, ft, normalizer.bands, tile)
    model = SegmentationModel(encoder, build_head(spec), ft.n_blocks).to(ctx.device)
    weights = (
        class_weights(dataset.manifest["splits"]["tr"]["class_pixels"])
        if ft.class_weights
        else None
    )
    with stage_run(cfg, "finetune") as tracker:
        tracker.set_tags(
            {
                "encoder_uri": enc_info["uri"],
                "method": enc_info["method"],
                "head": ft.head,
                "normalizer": normalizer.fingerprint,
                "results": name,
            }
        )
        if registered is not None:
            tracker.set_tags({"encoder_model": registered["uri"]})
        tracker.name_after(name)
        tracker.log_params({"encoder_uri": enc_info["uri"]})  # the config's may be '' or relative
        ctx = ctx.logging_to(tracker.log_metrics)
        loss_fn = make_loss(ft, weights)
        history = train_head(model, normalizer, dataset.split("tr"), ft, ctx, loss_fn=loss_fn)
        split = dataset.split(ft.eval_split)
        tile_result = evaluate_tiles(model, normalizer, split, ctx, ft.batch_size).compute()
        scene_matrix, shown = evaluate_scenes(model, normalizer, dataset, ft, ctx)
        scene_result = scene_matrix.compute()
        metrics = {
            "kind": "finetune",
            "name": name,
            "encoder": {k: enc_info[k] for k in ("uri", "method", "factory")},
            "head": ft.head,
            "dataset": dataset.uri,
            "normalizer": normalizer.fingerprint,
            "tile": tile_result,
            "scene": scene_result,
            "scene_inference": "sliding",  # tile-size windows at eval_stride, eval_blend
            "history": history,
            "config": asdict(ft),
            "seconds": time.perf_counter() - start,
        }
        record = {
            "format": HEAD_FORMAT,
            "head": spec,
            "state_dict": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
            "encoder": enc_info,
            "normalizer": normalizer.to_dict(),
            "tile_size": tile,
            "dataset": {"uri": dataset.uri, "fingerprint": dataset.normalizer.fingerprint},
            "config": asdict(ft),
        }
        write_results(store, result_key(name), metrics, shown, record)
        tracker.log_metrics(
            summary("tile", tile_result) | summary("scene", scene_result),
            step=int(history[-1]["step"]),
        )
        tracker.log_dict(metrics, "metrics.json")
    log.info(
        "%s: tile mIoU %s, scene mIoU %s (%.1f s)",
        name,
        tile_result["miou"],
        scene_result["miou"],
        metrics["seconds"],
    )
    return FinetuneResult(
        name=name,
        results_uri=store.join(result_key(name)),
        head_uri=store.join(result_key(name, HEAD)),
        tile_miou=tile_result["miou"],
        scene_miou=scene_result["miou"],
        seconds=metrics["seconds"],
    )


def resolve_encoder(uri: str, store: Storage) -> str:
    """The encoder URI that ``finetune.encoder`` names, checked to exist before anything trains.

    ``random:<factory>`` and ``scheme://…`` URIs are used as given, and so is an absolute path.
    A relative name is a file (relative to the working directory) if there is one, else a key in
    the artifact store, so presets can say ``checkpoints/mae/encoder.pt`` wherever the store is.
    ConfigError naming ``finetune.encoder``, what it holds and where it was looked for otherwise.
    """
    given = f"finetune.encoder={uri!r}"
    if uri.startswith(RANDOM_PREFIX):
        factory = uri[len(RANDOM_PREFIX) :]
        if factory not in MODELS:
            raise ConfigError(
                f"{given}: unknown model factory {factory!r}; known factories: {sorted(MODELS)}"
            )
        return uri
    if "://" in uri:
        parent, _, name = uri.rstrip("/").rpartition("/")
        try:
            found = open_storage(parent).exists(name)
        except ValueError as exc:  # unsupported scheme, malformed URI or key
            raise ConfigError(f"{given}: {exc}") from exc
        if not found:
            raise ConfigError(f"{given}: no such file")
        return uri
    path = Path(uri).expanduser()
    if path.is_absolute():
        if not path.is_file():
            raise ConfigError(f"{given}: no such file")
        return str(path)
    if path.is_file():
        return str(path.absolute())  # recorded in results: independent of the working directory
    try:
        key_found = store.exists(uri)
    except ValueError:  # not a valid store key ('..' components): only the file was possible
        raise ConfigError(f"{given}: no such file ({path.absolute()})") from None
    if key_found:
        return store.join(uri)
    raise ConfigError(
        f"{given}: no such file; looked for {path.absolute()} and for key {uri!r} in the "
        f"artifact store ({store.join(uri)})"
    )


def summary(prefix: str, result: dict[str, Any]) -> dict[str, float]:
    """``{"<prefix>_miou", "<prefix>_macc", "<prefix>_oa"}`` for MLflow (Nones left out)."""
    return {f"{prefix}_{k}": result[k] for k in ("miou", "macc", "oa") if result[k] is not None}


def write_results(
    store: Storage,
    prefix: str,
    metrics: dict[str, Any],
    shown: dict[str, np.ndarray],
    record: dict[str, Any],
) -> None:
    """All three files or none; metrics.json (the commit marker) is written last."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **shown)
    with store.transaction(prefix) as tx:
        tx.put_bytes(PREDICTIONS, buffer.getvalue())
        torch.save(record, tx.path(HEAD))
        tx.done(HEAD)
        tx.commit({METRICS: json.dumps(metrics, indent=1).encode()})
