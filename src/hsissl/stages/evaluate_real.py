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

from hsissl import methods
from hsissl.config import Config, RealEvalConfig
from hsissl.config_rules import refuse
from hsissl.data import realdata
from hsissl.data.geotiff import read_label
from hsissl.data.normalize import Normalizer
from hsissl.data.shards import ShardDataset
from hsissl.layout import METRICS, dataset_uri, result_key, run_dir_of, storage_of
from hsissl.pretrain.checkpoint import build_encoder, load_model
from hsissl.pretrain.trainer import pretrain
from hsissl.report import real_table
from hsissl.segment.pixel_knn import PixelKNN
from hsissl.segment.real_eval import (
    evaluate_scene,
    layout_scenes,
    load_eval_scene,
    summarise,
    work_units,
)
from hsissl.stages import ingest
from hsissl.stages.results import EvaluateRealResult
from hsissl.tracking import stage_run

log = logging.getLogger(__name__)
# the dataset the real scenes are ingested as (datasets/real), whatever data.name says; the
# preset names it too, so that `hsissl report --config configs/real.yaml` finds it
DATASET = "real"


def pretrain_encoders(cfg: Config, root: Path) -> tuple[dict[str, nn.Module], Normalizer, str]:
    rc = cfg.real
    data = replace(cfg.data, source=str(root), name=DATASET, tile_size=64, stride=rc.tile_stride)
    if not realdata.is_mat_folder(root):  # a converted folder: whatever splits it has, any size
        splits = sorted({p.parent.parent.name for p, _ in layout_scenes(root).values()})
        data = replace(data, splits=splits, scene_size=None)
    pcfg = replace(cfg, data=data)
    ingest.run(pcfg)
    normalizer = ShardDataset(dataset_uri(pcfg)).normalizer
    probe = pixel_probe(cfg, root, normalizer)
    encoders: dict[str, nn.Module] = {}
    builds: dict[str, dict] = {}  # method -> how to rebuild its encoder
    for method in rc.methods:
        mcfg = replace(pcfg, pretrain=replace(pcfg.pretrain, max_steps=rc.pretrain_steps, name=f"real-{method}",
                                              knn_tiles=0))  # fmt: skip
        spec = methods.get(method)
        result = pretrain(mcfg, spec.recipe_class(), stage=spec.stage, probe=probe)
        encoder, enc_norm, record = load_model(result["encoder_uri"])
        normalizer.check(enc_norm.fingerprint, f"encoder {result['encoder_uri']}")
        encoders[method] = encoder
        builds[method] = record["build"]
    encoders |= random_init_controls(builds, cfg.seed)
    return encoders, normalizer, dataset_uri(pcfg)


def pretraining_data(dataset: ShardDataset, steps: int) -> dict[str, Any]:
    """What the encoders were pretrained on (the issue asks the table to state it): tiles,
    scenes and distinct pixels of the ingested training split, from its manifest."""
    manifest = dataset.manifest
    split = manifest["splits"]["tr"]
    shapes = [
        c["shape"] for c in manifest.get("conversion", {}).get("tr", {}).values() if "shape" in c
    ]
    pixels = sum(h * w for h, w in shapes) if len(shapes) == len(split["scenes"]) else None
    return {"scenes": split["scenes"], "tiles": split["tiles"], "tile_size": manifest["tile_size"],
            "stride": manifest["stride"], "pixels": pixels, "steps": steps}  # fmt: skip


def random_init_controls(builds: dict[str, dict], seed: int) -> dict[str, nn.Module]:
    """The untrained encoder every pretraining must beat, one per architecture: ``random-init``
    for the first method's, ``random-init@<method>`` for each other (``real_table.control_name``)."""
    controls: dict[str, nn.Module] = {}
    first = next(iter(builds.values()), None)
    for method, build in builds.items():
        name = real_table.CONTROL if build == first else real_table.control_name(method)
        if name not in controls:
            torch.manual_seed(seed)
            controls[name] = build_encoder(build).eval()
    return controls


def pixel_probe(cfg: Config, root: Path, normalizer: Normalizer) -> PixelKNN:
    """The k-NN monitor of pretraining (every ``pretrain.knn_every`` steps, from step 0): the
    evaluated scenes' labelled pixels, split as the few-label protocol (else the first) splits
    them for the first seed."""
    rc = cfg.real
    block, fraction = rc.protocols.get("few-label") or next(iter(rc.protocols.values()))
    scenes = []
    for name in rc.scenes:
        image, label = load_eval_scene(root, name)
        scenes.append((normalizer(torch.from_numpy(image)), label))  # (32, H, W), (H, W)
    return PixelKNN(
        scenes, int(block), float(fraction), rc.seeds[0], rc.window_stride, cfg.pretrain.knn_k
    )


def check_config(rc: RealEvalConfig, root: Path) -> None:
    """Fail before any work (pretraining takes the better part of an hour on a CPU) on a scene
    that is unknown, unlabelled or not below ``root`` (the config's own values, methods and
    heads among them, were checked when it was loaded: ``hsissl.config_rules``)."""
    if not realdata.is_mat_folder(root):
        return _check_layout_scenes(rc, root)
    labelled = sorted(name for name, spec in realdata.SCENES.items() if realdata.is_labelled(spec))
    present = {p.stem for p in root.rglob("*.mat")}
    for i, name in enumerate(rc.scenes):
        if name not in labelled:
            raise refuse(f"real.scenes[{i}]", name, f"one of the labelled scenes {labelled}",
                         str(root))  # fmt: skip
        file = realdata.SCENES[name].file
        if Path(file).stem not in present:
            raise refuse(f"real.scenes[{i}]", name, f"its file {file} below real.source",
                         str(root), missing=True)  # fmt: skip


def _check_layout_scenes(rc: RealEvalConfig, root: Path) -> None:
    scenes = layout_scenes(root)
    if not scenes:
        raise refuse("real.source", rc.source, f"a folder of the known .mat scenes "
                     f"{sorted(realdata.SCENES)} or a WHU-OHS layout (<split>/image/*.tif, as "
                     "written by hsissl convert)", str(root), missing=True)  # fmt: skip
    for i, name in enumerate(rc.scenes):
        if name not in scenes:
            raise refuse(f"real.scenes[{i}]", name, f"one of the scenes found there "
                         f"{sorted(scenes)}", str(root))  # fmt: skip
        if not read_label(scenes[name][1]).any():
            raise refuse(f"real.scenes[{i}]", name, "a scene with labelled pixels",
                         str(scenes[name][1]))  # fmt: skip


def run(cfg: Config) -> EvaluateRealResult:
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
                    for r in evaluate_scene(cfg.real, name, root, encoders, normalizer, bar)]  # fmt: skip
        summary, markdown = summarise(rows)
        tables = real_table.scene_tables(rows)
        data = pretraining_data(ShardDataset(data_uri), cfg.real.pretrain_steps)
        tables_md = real_table.markdown(tables, data)
        result = {"kind": real_table.REAL_KIND, "name": cfg.real.name, "dataset": data_uri,
                  "normalizer": normalizer.fingerprint, "pretraining": data, "rows": rows,
                  "summary": summary, "tables": tables, "seconds": time.perf_counter() - start}  # fmt: skip
        with storage_of(cfg).transaction(result_key(cfg.real.name)) as tx:  # like every result
            tx.commit({METRICS: json.dumps(result, indent=1).encode(),
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
    return EvaluateRealResult(storage_of(cfg).join(result_key(cfg.real.name)), markdown,
                              tables_md)  # fmt: skip
