"""Gather what the report shows from the artifact store, and the few model outputs it computes.

Inputs: ``results/*/metrics.json`` (+ ``predictions.npz``), the dataset manifest, encoder
records ``checkpoints/*/encoder.pt`` with their ``history.json``, and MAE training states
``checkpoints/*/train.pt``. The report is the pipeline's exit task, so it also runs after a
failure: anything missing or unreadable is recorded in ``problems`` instead of raising.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hsissl import methods
from hsissl.config import Config
from hsissl.config_rules import HEADS
from hsissl.data.normalize import Normalizer
from hsissl.data.shards import ShardDataset
from hsissl.layout import (
    CHECKPOINTS,
    ENCODER,
    HISTORY,
    METRICS,
    PREDICTIONS,
    RESULTS,
    TRAIN_STATE,
    checkpoint_key,
    dataset_uri,
    folder_name,
    result_key,
    storage_of,
)
from hsissl.pretrain import checkpoint
from hsissl.pretrain.reconstruction import load_mae, reconstruct
from hsissl.report.reference import references_for
from hsissl.storage import Storage

log = logging.getLogger(__name__)

HEAD_ORDER = HEADS  # finetune heads in the report: the config's order
TILE_SPLITS = ("ts", "va", "tr")  # where example tiles come from, first present wins
UNFINISHED = (".partial-", ".old-")  # folders of an unfinished/replaced transaction
SEGMENTATION_KINDS = ("finetune", "baseline")  # results with tile/scene metrics


@dataclass(eq=False)  # compared by identity: it holds arrays
class ResultRun:
    """One ``results/<name>/`` folder."""

    name: str
    metrics: dict[str, Any]
    predictions: dict[str, np.ndarray] | None = None  # predictions.npz arrays, if written

    @property
    def kind(self) -> str:
        return str(self.metrics.get("kind", "?"))

    @property
    def method(self) -> str:
        return str((self.metrics.get("encoder") or {}).get("method", "?"))

    @property
    def head(self) -> str:
        return str(self.metrics.get("head", "?"))


@dataclass
class EncoderRun:
    """One ``checkpoints/<name>/`` folder holding an encoder record."""

    name: str
    uri: str
    record: dict[str, Any]  # the encoder record without its weights
    history: list[dict[str, float]] = field(default_factory=list)
    train_state: bool = False  # train.pt beside it (the MAE decoder lives there)

    @property
    def method(self) -> str:
        return str(self.record.get("method", "?"))

    @property
    def fingerprint(self) -> str:
        return str(self.record.get("normalizer", {}).get("fingerprint", "?"))


@dataclass
class ReportInputs:
    store: Storage
    dataset_uri: str
    dataset: ShardDataset | None
    results: list[ResultRun]
    encoders: list[EncoderRun]
    problems: list[str]  # inputs that were asked for or found but could not be read
    references: list[dict[str, Any]] = field(default_factory=list)  # chance rows, per eval split

    @property
    def manifest(self) -> dict[str, Any] | None:
        return self.dataset.manifest if self.dataset is not None else None

    @property
    def dataset_fingerprint(self) -> str | None:
        return self.dataset.normalizer.fingerprint if self.dataset is not None else None

    @property
    def segmentation(self) -> list[ResultRun]:
        """Finetune and baseline runs (those with tile/scene metrics), in table order."""
        return sort_runs([r for r in self.results if r.kind in SEGMENTATION_KINDS])


def collect(cfg: Config) -> ReportInputs:
    """Everything in the store the report needs (``cfg.report.results`` or every result)."""
    store = storage_of(cfg)
    problems: list[str] = []
    uri = dataset_uri(cfg)
    dataset = None
    try:
        dataset = ShardDataset(uri)
    except Exception as exc:  # missing or unreadable: the report says so
        problems.append(f"dataset {uri}: {exc}")
    results = [
        r
        for name in result_names(store, cfg.report.results, problems)
        if (r := _load_result(store, name, problems)) is not None
    ]
    encoders = [
        e
        for name in encoder_names(store)
        if (e := _load_encoder_run(store, name, problems)) is not None
    ]
    encoders.sort(key=lambda e: (_rank(e.method, method_order()), e.name))
    references = references_for(
        dataset.manifest if dataset is not None else None,
        [r.metrics for r in results if r.kind in SEGMENTATION_KINDS],
        problems,
    )
    for p in problems:
        log.warning("report input: %s", p)
    return ReportInputs(store, uri, dataset, results, encoders, problems, references)


def result_names(store: Storage, wanted: list[str], problems: list[str]) -> list[str]:
    """``wanted`` (checked to exist), else every committed ``results/<name>/metrics.json``."""
    found = sorted(
        {
            folder_name(key, RESULTS)
            for key in store.list(RESULTS)
            if folder_name(key, RESULTS)
            and key.endswith(f"/{METRICS}")
            and not any(u in key for u in UNFINISHED)
        }
    )
    if not wanted:
        return found
    missing = [n for n in wanted if n not in found]
    if missing:
        problems.append(
            f"report.results names {missing}, but {store.join(RESULTS)} holds only {found}"
        )
    return [n for n in wanted if n in found]


def encoder_names(store: Storage) -> list[str]:
    """Every ``checkpoints/<name>`` that holds an ``encoder.pt``."""
    return sorted(
        {
            folder_name(key, CHECKPOINTS)
            for key in store.list(CHECKPOINTS)
            if folder_name(key, CHECKPOINTS)
            and key.endswith(f"/{ENCODER}")
            and not any(u in key for u in UNFINISHED)
        }
    )


def _load_result(store: Storage, name: str, problems: list[str]) -> ResultRun | None:
    key = result_key(name, METRICS)
    try:
        metrics = json.loads(store.get_bytes(key))
    except Exception as exc:
        problems.append(f"{store.join(key)}: unreadable ({exc})")
        return None
    metrics["name"] = name  # the folder is the run's identity in the store (and in the report)
    predictions = None
    npz = result_key(name, PREDICTIONS)
    if store.exists(npz):
        try:
            with np.load(io.BytesIO(store.get_bytes(npz))) as data:
                predictions = {k: data[k] for k in data.files}
        except Exception as exc:
            problems.append(f"{store.join(npz)}: unreadable ({exc})")
    return ResultRun(name, metrics, predictions)


def _load_encoder_run(store: Storage, name: str, problems: list[str]) -> EncoderRun | None:
    try:
        record = checkpoint.load(store, checkpoint_key(name, ENCODER))
    except Exception as exc:
        problems.append(f"{store.join(checkpoint_key(name, ENCODER))}: unreadable ({exc})")
        return None
    record.pop("state_dict", None)  # weights are loaded again, one encoder at a time, when used
    history: list[dict[str, float]] = []
    if store.exists(checkpoint_key(name, HISTORY)):
        try:
            history = json.loads(store.get_bytes(checkpoint_key(name, HISTORY)))
        except Exception as exc:
            problems.append(f"{store.join(checkpoint_key(name, HISTORY))}: unreadable ({exc})")
    return EncoderRun(
        name,
        store.join(checkpoint_key(name, ENCODER)),
        record,
        history,
        store.exists(checkpoint_key(name, TRAIN_STATE)),
    )


def method_order() -> tuple[str, ...]:
    """Baseline, control, then the registered methods (hsissl.methods)."""
    return ("none", "random", *methods.names())


def _rank(value: str, order: tuple[str, ...]) -> int:
    return order.index(value) if value in order else len(order)


def sort_runs(runs: list[ResultRun]) -> list[ResultRun]:
    """Baselines first, then by head; within a head the random-init control, then the methods."""
    return sorted(
        runs,
        key=lambda r: (
            r.kind != "baseline",
            _rank(r.head, HEAD_ORDER),
            r.head,
            _rank(r.method, method_order()),
            r.name,
        ),
    )


# -- example tiles, attention, MAE reconstructions ------------------------------------------------
@dataclass
class Tiles:
    split: str
    indices: np.ndarray  # (n,) tile rows in the split
    images: np.ndarray  # (n, C, T, T) int16, stored units
    labels: np.ndarray  # (n, T, T) uint8


def example_tiles(dataset: ShardDataset, count: int) -> Tiles:
    """``count`` tiles spread evenly over the first non-empty split of ts, va, tr."""
    for split in TILE_SPLITS:
        if split in dataset.splits and len(dataset.split(split)):
            view = dataset.split(split)
            idx = np.unique(np.linspace(0, len(view) - 1, count).round().astype(np.int64))
            images, labels = view.get(idx)
            return Tiles(split, idx, images, labels)
    raise ValueError(f"{dataset.uri}: no tiles in any of the splits {TILE_SPLITS}")


@torch.no_grad()
def cls_attention(encoder: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Last-block attention of the CLS token to the patch tokens, mean over heads.

    x: (B, C, T, T) normalised tiles -> (B, h, w) maps (each sums to at most 1: the CLS token
    also attends to itself and to register tokens, which are left out).
    """
    attn = encoder.get_last_attention(x)  # (B, heads, N, N)
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    cls = attn[:, :, 0, prefix:].float().mean(dim=1)  # (B, L)
    side = int(round(cls.shape[1] ** 0.5))
    if side * side != cls.shape[1]:
        raise ValueError(
            f"{type(encoder).__name__}: {cls.shape[1]} patch tokens after "
            f"{prefix} prefix tokens is not a square grid"
        )
    return cls.reshape(-1, side, side).cpu().numpy()


def encoder_attention(uri: str, images: np.ndarray) -> tuple[np.ndarray, Normalizer]:
    """CLS attention maps (n, h, w) of the encoder record ``uri`` on raw ``images``, normalised
    with the encoder's own Normalizer (returned too, for the fingerprint check)."""
    encoder, normalizer, _ = checkpoint.load_model(uri)
    x = normalizer(torch.from_numpy(np.ascontiguousarray(images)))  # (n, C, T, T) float32
    return cls_attention(encoder, x), normalizer


@dataclass
class MAEReconstruction:
    original: np.ndarray  # (n, C, T, T) normalised
    reconstruction: np.ndarray  # (n, C, T, T): predicted masked patches, visible ones pasted
    mask: np.ndarray  # (n, T, T) bool, True = masked
    per_band_mse: np.ndarray  # (C,) on masked pixels, normalised units
    step: int
    mask_ratio: float


@torch.no_grad()
def mae_reconstruct(
    store: Storage, name: str, images: np.ndarray, seed: int = 0
) -> MAEReconstruction:
    """Reconstruct ``images`` (n, C, T, T raw) with the MAE of run ``name`` under a seeded mask."""
    mae = load_mae(store.join(checkpoint_key(name, ENCODER)))
    x = mae.normalizer(torch.from_numpy(np.ascontiguousarray(images)))  # (n, C, T, T)
    recon, mask_px = reconstruct(mae.model, x, mae.mask_ratio, seed)  # mask_px (n, 1, T, T)
    err = ((recon - x) ** 2 * mask_px).sum(dim=(0, 2, 3)) / mask_px.sum().clamp(min=1)  # (C,)
    return MAEReconstruction(
        x.numpy(),
        recon.numpy(),
        mask_px[:, 0].bool().numpy(),
        err.double().numpy(),
        mae.step,
        mae.mask_ratio,
    )
