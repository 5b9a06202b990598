"""evaluate-real's models and loop over one scene: per-pixel spectral floors, frozen encoders
with a logistic-regression probe and with the finetune heads, DeepLabV3+ from scratch, each
scored on spatially disjoint block splits (``hsissl.segment.blocks``). The stage
``hsissl.stages.evaluate_real`` pretrains the encoders and wires these together.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
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

from hsissl.config import ConfigError, RealEvalConfig
from hsissl.config_rules import PIXEL_HEADS
from hsissl.data import realdata
from hsissl.data.geotiff import read_image, read_label
from hsissl.data.normalize import Normalizer
from hsissl.pretrain.runtime import cpu_bf16
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

log = logging.getLogger(__name__)


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
    probes = sum(head in PIXEL_HEADS for head in rc.heads)
    features = n_encoders * (bool(len(rc.heads) - probes) + bool(probes))  # window, pixel features
    trained = n_encoders * (len(rc.heads) - probes) * rc.head_steps + rc.baseline_steps
    per_split = 2 + n_encoders * probes + trained  # floors, probes, trained models
    return features + len(rc.protocols) * len(rc.seeds) * per_split


def pixel_classifier(
    kind: str, features: np.ndarray, label: np.ndarray, train: np.ndarray, seed: int, c: float = 1.0
) -> np.ndarray:
    """Per-pixel classifier on (D, H, W) features; returns an (H, W) class map. ``c``: the
    logistic regression's inverse L2 strength (scikit-learn's ``C``)."""
    x = features.reshape(features.shape[0], -1).T  # (H*W, D)
    scaler = StandardScaler().fit(x[train.ravel()])
    x = scaler.transform(x)
    if kind == "lr":
        model = LogisticRegression(max_iter=500, C=c)
    else:
        model = RandomForestClassifier(n_estimators=200, n_jobs=-1, random_state=seed)
    model.fit(x[train.ravel()], label.ravel()[train.ravel()])
    return model.predict(x).reshape(label.shape)


def probe_inputs(head: str, image: torch.Tensor, features: torch.Tensor) -> np.ndarray:
    """What a per-pixel head classifies: the (D, H, W) frozen features (``probe``), or the
    (C, H, W) normalised spectrum in front of them (``spec-probe``: patch features upsampled
    from a coarse map blur the spectral detail the per-pixel floors use; this keeps it)."""
    if head == "spec-probe":
        return torch.cat([image, features]).numpy()  # (C + D, H, W)
    return features.numpy()


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
    bf16: bool = False,
) -> np.ndarray:
    """Fit a dense (1, K, H, W) predictor on the training pixels of one scene; return its class map.

    Training sees the 8 dihedral views of the scene as one batch (BatchNorm needs more than
    one sample, and the views are free augmentation); prediction uses the scene as it is.
    ``bf16``: train under CPU bf16 autocast (the loss and the prediction stay fp32).
    """
    torch.manual_seed(seed)
    target = torch.from_numpy(np.where(train, label, 0).astype(np.int64))[None]  # (1, H, W)
    batch, batch_target = dihedral(inputs), dihedral(target)  # (8, C, S, S), (8, S, S)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch)  # (8, K, S, S)
        loss = F.cross_entropy(logits.float(), batch_target, ignore_index=0)
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


def evaluate_scene(rc: RealEvalConfig, name: str, root: Path, encoders: dict[str, nn.Module],
                   normalizer: Normalizer, bar: tqdm | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every model on every split of one scene; ``bar`` advances after each feature pass and fit."""
    image, label = load_eval_scene(root, name)
    x = normalizer(torch.from_numpy(image))  # (32, H, W)
    windows = SceneWindows(tile=64, stride=rc.window_stride)
    # (N, 32, 64, 64): every dihedral view's windows, for the trained heads' cached features
    cut = windows.cut(x) if set(rc.heads) - set(PIXEL_HEADS) else None
    bar = bar if bar is not None else tqdm(disable=True)  # a no-op bar
    bar.set_description(f"{name} features")
    cached, probes = {}, {}
    for k, e in encoders.items():
        if cut is not None:
            bar.set_postfix_str(f"{k} window features")
            cached[k] = window_features(e, cut, n_blocks=4)
            bar.update()
        if set(PIXEL_HEADS) & set(rc.heads):
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
                    if head in PIXEL_HEADS:
                        inputs = probe_inputs(head, x, probes[enc])
                        pred = pixel_classifier("lr", inputs, label, train, seed)
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
            pred = train_dense(deeplab, x[None], label, train, rc.baseline_steps, 1e-3, seed,
                               on_step=bar.update, bf16=rc.baseline_bf16 and cpu_bf16())  # fmt: skip
            scores["deeplabv3plus"] = miou(pred, label, test)
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
