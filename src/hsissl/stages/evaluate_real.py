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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from hsissl import methods
from hsissl.config import Config, ConfigError, RealEvalConfig
from hsissl.config_rules import refuse
from hsissl.data import realdata
from hsissl.data.geotiff import read_image, read_label
from hsissl.data.normalize import Normalizer
from hsissl.data.shards import ShardDataset
from hsissl.layout import METRICS, dataset_uri, result_key, run_dir_of, storage_of
from hsissl.pretrain.checkpoint import build_encoder, load_encoder
from hsissl.pretrain.trainer import pretrain
from hsissl.report import real_table
from hsissl.segment.baseline import DeepLabV3PlusAux
from hsissl.segment.blocks import protocol_split
from hsissl.segment.metrics import ConfusionMatrix
from hsissl.segment.scene_heads import (
    SceneWindows,
    dihedral_views,
    train_scene_head,
    window_features,
)
from hsissl.segment.sliding import predict_scene
from hsissl.stages import ingest
from hsissl.stages.results import EvaluateRealResult
from hsissl.tracking import stage_run

log = logging.getLogger(__name__)
NUM_LOGITS = 25


@torch.no_grad()
def pixel_features(
    encoder: nn.Module, image: torch.Tensor, stride: int, n_blocks: int = 4
) -> torch.Tensor:
    """Frozen-encoder features at every pixel: (C, H, W) normalised -> (n_blocks * D, H, W).

    Patch maps of the last blocks are upsampled to each 64-px window and blended where
    sliding windows overlap (weighted toward window centres, :mod:`hsissl.segment.sliding`).
    """
    probe = encoder.get_intermediate_layers(image[None, :, :64, :64], n=n_blocks)
    dim = sum(p.shape[1] for p in probe)

    def window_features(windows: torch.Tensor) -> torch.Tensor:
        maps = torch.cat(
            encoder.get_intermediate_layers(windows, n=n_blocks), dim=1
        )  # (N, D, h, w)
        return F.interpolate(maps, size=windows.shape[-2:], mode="bilinear", align_corners=False)

    return predict_scene(window_features, image, tile=64, stride=stride, num_classes=dim)[0]


def miou(pred: np.ndarray, label: np.ndarray, test: np.ndarray) -> float:
    cm = ConfusionMatrix()
    cm.update(
        torch.from_numpy(pred.astype(np.int64)),
        torch.from_numpy(np.where(test, label, 0).astype(np.int64)),
    )
    return float(cm.compute()["miou"])


def floor_scores(
    x: np.ndarray, label: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int
) -> dict[str, float]:
    """The per-pixel spectral floors every encoder must beat: test mIoU of logistic regression
    and random forest on the (C, H, W) normalised spectra, fit on the training pixels."""
    return {f"pixel-{k}": miou(pixel_classifier(k, x, label, train, seed), label, test)
            for k in ("lr", "rf")}  # fmt: skip


def work_units(rc: RealEvalConfig, n_encoders: int) -> int:
    """Progress-bar steps of one scene: one per feature pass and per closed-form fit (floors,
    probes), one per optimiser step of the trained heads and DeepLabV3+ (most of the time)."""
    probe = "probe" in rc.heads
    features = n_encoders * (1 + probe)
    trained = (n_encoders * (len(rc.heads) - probe) + 1) * rc.head_steps  # heads, DeepLabV3+
    per_split = 2 + n_encoders * probe + trained  # floors, probes, trained models
    return features + len(rc.protocols) * len(rc.seeds) * per_split


def pixel_classifier(
    kind: str, features: np.ndarray, label: np.ndarray, train: np.ndarray, seed: int
) -> np.ndarray:
    """Per-pixel classifier on (D, H, W) features; returns an (H, W) class map."""
    x = features.reshape(features.shape[0], -1).T  # (H*W, D)
    scaler = StandardScaler().fit(x[train.ravel()])
    x = scaler.transform(x)
    if kind == "lr":
        model = LogisticRegression(max_iter=500)
    else:
        model = RandomForestClassifier(n_estimators=200, n_jobs=-1, random_state=seed)
    model.fit(x[train.ravel()], label.ravel()[train.ravel()])
    return model.predict(x).reshape(label.shape)


def dihedral(x: torch.Tensor) -> torch.Tensor:
    """(1, ..., H, W) -> (8, ..., S, S): the 8 flips/rotations of the scene's top-left square."""
    side = min(x.shape[-2:])
    return torch.cat(dihedral_views(x[..., :side, :side]))


def train_dense(
    model: nn.Module,
    inputs: torch.Tensor,
    label: np.ndarray,
    train: np.ndarray,
    steps: int,
    lr: float,
    seed: int,
    on_step: Callable[[], object] | None = None,
) -> np.ndarray:
    """Fit a dense (1, K, H, W) predictor on the training pixels of one scene; return its class map.

    Training sees the 8 dihedral views of the scene as one batch (BatchNorm needs more than
    one sample, and the views are free augmentation); prediction uses the scene as it is.
    """
    torch.manual_seed(seed)
    target = torch.from_numpy(np.where(train, label, 0).astype(np.int64))[None]  # (1, H, W)
    batch, batch_target = dihedral(inputs), dihedral(target)  # (8, C, S, S), (8, S, S)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(batch), batch_target, ignore_index=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step()
    model.eval()
    with torch.no_grad():
        logits = model(inputs)[0]
        logits[0] = -torch.inf  # never predict "unlabelled"
        return logits.argmax(0).numpy()


def layout_scenes(root: Path) -> dict[str, tuple[Path, Path]]:
    """Scene name -> (image, label) of a WHU-OHS-layout folder (e.g. ``hsissl convert``'s output)."""
    return {p.stem: (p, p.parent.parent / "label" / p.name)
            for p in sorted(Path(root).glob("*/image/*.tif"))}  # fmt: skip


def load_eval_scene(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """((32, H, W) int16, (H, W) uint8) of a catalogued .mat scene or a converted scene."""
    if realdata.is_mat_folder(root):
        return realdata.load_scene(root, realdata.SCENES[name])
    image_path, label_path = layout_scenes(root)[name]
    image = read_image(image_path)
    if image.dtype != np.int16:
        raise ConfigError(f"{image_path}: dtype {image.dtype}, expected int16 reflectance x 10000 "
                          "(hsissl convert writes it)")  # fmt: skip
    return image, read_label(label_path)


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
        spec = methods.get(method)
        result = pretrain(mcfg, spec.recipe_class(), stage=spec.stage)
        encoder, enc_norm, record = load_encoder(result["encoder_uri"])
        normalizer.check(enc_norm.fingerprint, f"encoder {result['encoder_uri']}")
        encoders[method] = encoder
        build = build or record["build"]
    if build is not None:
        torch.manual_seed(cfg.seed)
        encoders["random-init"] = build_encoder(
            build
        ).eval()  # the control every pretraining must beat
    return encoders, normalizer, dataset_uri(pcfg)


def evaluate_scene(cfg: Config, name: str, root: Path, encoders: dict[str, nn.Module],
                   normalizer: Normalizer, bar: tqdm | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every model on every split of one scene; ``bar`` advances after each feature pass and fit."""
    rc = cfg.real
    image, label = load_eval_scene(root, name)
    x = normalizer(torch.from_numpy(image))  # (32, H, W)
    windows = SceneWindows(tile=64, stride=rc.window_stride)
    cut = windows.cut(x)  # (N, 32, 64, 64): the windows of every dihedral view
    bar = bar if bar is not None else tqdm(disable=True)  # a no-op bar
    bar.set_description(f"{name} features")
    cached, probes = {}, {}
    for k, e in encoders.items():
        bar.set_postfix_str(f"{k} window features")
        cached[k] = window_features(e, cut, n_blocks=4)
        bar.update()
        if "probe" in rc.heads:
            bar.set_postfix_str(f"{k} pixel features")
            probes[k] = pixel_features(e, x, rc.window_stride)
            bar.update()
    rows = []
    for protocol, (block, fraction) in rc.protocols.items():
        for seed in rc.seeds:
            train, test = protocol_split(label, int(block), float(fraction), seed)
            bar.set_description(f"{name} {protocol} seed {seed}")
            bar.set_postfix_str("per-pixel floors")
            scores = floor_scores(x.numpy(), label, train, test, seed)
            bar.update(2)
            for enc, encoder in encoders.items():
                for head in rc.heads:
                    bar.set_postfix_str(f"{enc}+{head}")
                    if head == "probe":
                        pred = pixel_classifier("lr", probes[enc].numpy(), label, train, seed)
                        bar.update()
                    else:
                        pred = train_scene_head(encoder, head, x, np.where(train, label, 0),
                                                feats=cached[enc], windows=windows,
                                                steps=rc.head_steps, lr=rc.head_lr[head],
                                                batch_size=rc.head_batch, seed=seed,
                                                on_step=bar.update)  # fmt: skip
                    scores[f"{enc}+{head}"] = miou(pred, label, test)
            bar.set_postfix_str("deeplabv3plus")
            torch.manual_seed(seed)
            deeplab = DeepLabV3PlusAux(encoder=rc.baseline_encoder, in_channels=32)
            scores["deeplabv3plus"] = miou(train_dense(deeplab, x[None], label, train, rc.head_steps, 1e-3, seed,
                                                       on_step=bar.update), label, test)  # fmt: skip
            rows.append({"scene": name, "protocol": protocol, "seed": seed, "train_pixels": int(train.sum()),
                         "test_pixels": int(test.sum()), "miou": scores})  # fmt: skip
            log.info("%s %s seed %d: %s", name, protocol, seed, json.dumps(scores))
    return rows


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Mean and std of mIoU over seeds per (scene, protocol, model), and a Markdown table."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        key = f"{row['scene']} / {row['protocol']}"
        for model, value in row["miou"].items():
            table.setdefault(key, {}).setdefault(model, []).append(value)
    summary = {k: {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for m, v in models.items()}
               for k, models in table.items()}  # fmt: skip
    columns = sorted(summary)
    models = sorted({m for v in summary.values() for m in v})
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m in models:
        cells = [f"{100 * summary[c][m]['mean']:.1f} ± {100 * summary[c][m]['std']:.1f}" if m in summary[c] else "–"
                 for c in columns]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return summary, "\n".join(lines)


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
                    for r in evaluate_scene(cfg, name, root, encoders, normalizer, bar)]  # fmt: skip
        summary, markdown = summarise(rows)
        tables = real_table.scene_tables(rows)
        tables_md = real_table.markdown(tables)
        result = {"kind": real_table.REAL_KIND, "name": cfg.real.name, "dataset": data_uri,
                  "normalizer": normalizer.fingerprint, "rows": rows, "summary": summary,
                  "tables": tables, "seconds": time.perf_counter() - start}  # fmt: skip
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
