"""``hsissl evaluate-real``: the whole chain on the real scenes in ../shared/data.

Pretrains every method on overlapping 64-px tiles of all shared scenes (resampled to the
32 OHS bands), then evaluates each labelled scene with spatially disjoint block splits
(two protocols x seeds): per-pixel spectral floors (logistic regression, random forest),
frozen encoders (pretrained and random-init) with a logistic-regression probe on per-pixel
features and with the finetune stage's heads (multiscale linear, conv decoder, Segmenter)
trained on the scene's windows, and DeepLabV3+ from scratch. Everything is normalised by the one
Normalizer of the ingested real dataset (carried by the encoders). Whole-scene predictions
blend overlapping windows toward their centres (``hsissl.segment.sliding``). A progress bar
names the scene, protocol, seed and model that runs. Output: ``results/<real.name>/``
``metrics.json`` (every seed's scores), ``tables.json`` / ``tables.md`` (one table per scene
with the paired differences to the better floor and to the random-init control,
``hsissl.report.real_table``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from hsissl.config import Config, ConfigError, RealEvalConfig
from hsissl.data import realdata
from hsissl.data.geotiff import read_label
from hsissl.data.normalize import Normalizer
from hsissl.data.shards import ShardDataset
from hsissl.models.heads import HEADS
from hsissl.pretrain.checkpoint import build_encoder, load_model
from hsissl.pretrain.trainer import pretrain
from hsissl.report import real_table
from hsissl.segment.real_eval import evaluate_scene, layout_scenes, summarise, work_units
from hsissl.stages import ingest
from hsissl.stages.common import dataset_uri, run_dir_of, stage_run, storage_of

log = logging.getLogger(__name__)
METHODS = ("mae", "dinov2", "ssvit")


def _recipe(method: str):
    if method == "mae":
        from hsissl.pretrain.mae import MAERecipe as recipe
    elif method == "dinov2":
        from hsissl.pretrain.dinov2 import DINOv2Recipe as recipe
    elif method == "ssvit":
        from hsissl.pretrain.ssvit import SSViTRecipe as recipe
    else:
        raise ValueError(f"real.methods: unknown method {method!r}; expected mae, dinov2 or ssvit")
    return recipe


def pretrain_encoders(cfg: Config, root: Path) -> tuple[dict[str, nn.Module], Normalizer, str]:
    rc = cfg.real
    data = replace(cfg.data, source=str(root), name="real", tile_size=64, stride=rc.tile_stride)
    if not realdata.is_mat_folder(root):  # a converted folder: whatever splits it has, any size
        splits = sorted({p.parent.parent.name for p, _ in layout_scenes(root).values()})
        data = replace(data, splits=splits, scene_size=None)
    pcfg = replace(cfg, data=data)
    ingest.run(pcfg)
    normalizer = ShardDataset(dataset_uri(pcfg)).normalizer
    encoders: dict[str, nn.Module] = {}
    build = None
    for method in rc.methods:
        mcfg = replace(pcfg, pretrain=replace(pcfg.pretrain, max_steps=rc.pretrain_steps, name=f"real-{method}",
                                              knn_tiles=0))  # fmt: skip
        result = pretrain(mcfg, _recipe(method), stage=f"pretrain-{method}")
        encoder, enc_norm, record = load_model(result["encoder_uri"])
        normalizer.check(enc_norm.fingerprint, f"encoder {result['encoder_uri']}")
        encoders[method] = encoder
        build = build or record["build"]
    if build is not None:
        torch.manual_seed(cfg.seed)
        encoders["random-init"] = build_encoder(
            build
        ).eval()  # the control every pretraining must beat
    return encoders, normalizer, dataset_uri(pcfg)


def check_config(rc: RealEvalConfig, root: Path) -> None:
    """Fail before any work (pretraining takes the better part of an hour on a CPU) on an
    unknown method or head, a head without a learning rate, or a scene that is unknown,
    unlabelled or not below ``root``."""
    for method in rc.methods:
        if method not in METHODS:
            raise ConfigError(f"real.methods: unknown method {method!r}; expected {list(METHODS)}")
    for head in rc.heads:
        if head != "probe" and head not in HEADS:
            raise ConfigError(
                f"real.heads: unknown head {head!r}; expected probe or one of {sorted(HEADS)}"
            )
        if head != "probe" and head not in rc.head_lr:
            raise ConfigError(
                f"real.head_lr has no learning rate for head {head!r} (has {sorted(rc.head_lr)})"
            )
    if not realdata.is_mat_folder(root):
        return _check_layout_scenes(rc, root)
    labelled = sorted(name for name, spec in realdata.SCENES.items() if realdata.is_labelled(spec))
    for name in rc.scenes:
        if name not in labelled:
            raise ConfigError(f"real.scenes: {name!r} is not a labelled scene; expected some of "
                              f"{labelled}")  # fmt: skip
    if not realdata.is_mat_folder(root):
        raise FileNotFoundError(f"real.source={rc.source!r} ({root}) holds none of the known .mat "
                                f"scenes {sorted(realdata.SCENES)}")  # fmt: skip
    present = {p.stem for p in root.rglob("*.mat")}
    for name in rc.scenes:
        if Path(realdata.SCENES[name].file).stem not in present:
            raise FileNotFoundError(f"real.scenes: {name!r} ({realdata.SCENES[name].file}) "
                                    f"is not below real.source={rc.source!r} ({root})")  # fmt: skip


def _check_layout_scenes(rc: RealEvalConfig, root: Path) -> None:
    scenes = layout_scenes(root)
    if not scenes:
        raise FileNotFoundError(
            f"real.source={rc.source!r} ({root}) holds neither known .mat scenes "
            f"{sorted(realdata.SCENES)} nor a WHU-OHS layout (<split>/image/*.tif, as written by "
            "hsissl convert)"
        )
    for name in rc.scenes:
        if name not in scenes:
            raise ConfigError(f"real.scenes: {name!r} is not in {root}; found {sorted(scenes)}")
        if not read_label(scenes[name][1]).any():
            raise ConfigError(f"real.scenes: {name!r} has no labelled pixel ({scenes[name][1]})")


def run(cfg: Config) -> dict[str, Any]:
    root = Path(cfg.real.source).expanduser().resolve()
    check_config(cfg.real, root)
    start = time.perf_counter()
    encoders, normalizer, data_uri = pretrain_encoders(cfg, root)
    with stage_run(cfg, "evaluate-real") as tracker:
        total = len(cfg.real.scenes) * work_units(cfg.real, len(encoders))
        # one bar for all scenes (what runs, and the time left); log lines print above it
        with logging_redirect_tqdm(), tqdm(total=total, desc="evaluate-real", unit="step",
                                           dynamic_ncols=True) as bar:  # fmt: skip
            rows = [r for name in cfg.real.scenes
                    for r in evaluate_scene(cfg, name, root, encoders, normalizer, bar)]  # fmt: skip
        summary, markdown = summarise(rows)
        tables = real_table.scene_tables(rows)
        tables_md = real_table.markdown(tables)
        result = {"kind": real_table.REAL_KIND, "name": cfg.real.name, "dataset": data_uri,
                  "normalizer": normalizer.fingerprint, "rows": rows, "summary": summary,
                  "tables": tables, "seconds": time.perf_counter() - start}  # fmt: skip
        with storage_of(cfg).transaction(f"results/{cfg.real.name}") as tx:  # like every result
            tx.commit({"metrics.json": json.dumps(result, indent=1).encode(),
                       "tables.json": json.dumps(tables, indent=1).encode(),
                       "tables.md": tables_md.encode()})  # fmt: skip
        (run_dir_of(cfg) / f"{cfg.real.name}.md").write_text(markdown + "\n")
        local_tables = run_dir_of(cfg) / f"{cfg.real.name}-tables.md"
        local_tables.write_text(tables_md)
        tracker.log_dict(result, "metrics.json")
        tracker.log_artifact(local_tables)
        tracker.log_metrics({re.sub(r"[^\w\-./]", "_", f"{k}/{m}"): v["mean"] for k, ms in summary.items()
                             for m, v in ms.items()})  # fmt: skip
    print(tables_md)
    return {"results": storage_of(cfg).join(f"results/{cfg.real.name}"), "table": markdown,
            "tables": tables_md}  # fmt: skip
