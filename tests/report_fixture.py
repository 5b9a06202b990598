"""A fixed, small report input (no store, no dataset files): every section's table and text
path, for comparing what the report renders against a recorded rendering."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from hsissl.report.collect import EncoderRun, ReportInputs, ResultRun

META = [("generated", "2026-01-01 00:00 UTC"), ("artifact store", "file:///store/"),
        ("dataset", "file:///store/datasets/whu-ohs"), ("dataset Normalizer", "aaaa1111bbbb2222")]  # fmt: skip
TITLE = 'hsissl report: run <x> & "y"'  # escaped once in the page


def _seg(name: str, kind: str, method: str, head: str, miou: float, normalizer: str) -> dict:
    per_class = [0.1 * (i % 7) for i in range(24)]
    per_class[3] = None  # an absent class: shown as a dash
    part = {"miou": miou, "macc": miou + 0.05, "oa": miou + 0.2, "per_class_iou": per_class}
    return {
        "name": name, "kind": kind, "head": head, "normalizer": normalizer,
        "dataset": "file:///store/datasets/whu-ohs" if name != "odd" else "file:///other",
        "encoder": {"method": method, "factory": "vit_tiny_patch8_64", "uri": f"enc/{name}"},
        "tile": part, "scene": dict(part, miou=miou - 0.01), "seconds": 12.3,
        "scene_inference": {"mode": "sliding", "window": 64, "stride": 32},
        "history": [{"step": 1, "loss": 2.0}, {"step": 4, "loss": 1.0 + miou}] if name != "odd" else [],
    }  # fmt: skip


def inputs() -> ReportInputs:
    fp = "aaaa1111bbbb2222"
    label = (np.arange(16 * 16).reshape(16, 16) % 5).astype(np.uint8)
    predictions = {
        "scenes": np.array(["s1", "s2"]), "rgb": np.zeros((2, 16, 16, 3), np.uint8),
        "label": np.stack([label, label]), "pred": np.stack([label, (label + 1) % 5]),
    }  # fmt: skip
    results = [
        ResultRun("finetune-mae-linear", _seg("finetune-mae-linear", "finetune", "mae", "linear", 0.42, fp), predictions),
        ResultRun("finetune-random-linear", _seg("finetune-random-linear", "finetune", "random", "linear", 0.30, fp)),
        ResultRun("baseline", _seg("baseline", "baseline", "none", "deeplabv3plus", 0.5, fp)),
        ResultRun("stale <b>", _seg("stale <b>", "finetune", "mae", "linear", 0.9, "0123456789abcdef")),
        ResultRun("odd", _seg("odd", "finetune", "dinov2", "conv", 0.2, fp)),
        ResultRun("pca", {"kind": "pca", "name": "pca", "normalizer": fp,
                          "explained_variance": [0.7, 0.2, 0.05],
                          "per_band_mse": {"pca": [0.1] * 32, "decoder": [0.05] * 32},
                          "mean_mse": {"pca": 0.1, "decoder": 0.05}, "eval_split": "va",
                          "eval_tiles": 12}),
        ResultRun("real-eval", {"kind": "real-eval", "name": "real-eval", "rows": [
            {"scene": "s", "protocol": "few-label", "seed": k, "miou": v} for k, v in {
                0: {"pixel-lr": 0.5, "random-init+probe": 0.45, "mae+probe": 0.6},
                1: {"pixel-lr": 0.4, "random-init+probe": 0.4, "mae+probe": 0.46}}.items()]}),
        ResultRun("other", {"kind": "knn", "name": "other", "seconds": 3}),
    ]  # fmt: skip
    history = [{"step": 1, "loss": 1.5}, {"step": 4, "loss": 0.9}]
    encoders = [
        EncoderRun("mae", "file:///store/checkpoints/mae/encoder.pt",
                   {"method": "mae", "normalizer": {"fingerprint": fp}}, history),
        EncoderRun("dino", "file:///store/checkpoints/dino/encoder.pt",
                   {"method": "dinov2", "normalizer": {"fingerprint": "ffff"}}),
    ]  # fmt: skip
    manifest = {
        "tile_size": 64, "stride": 64, "bands": 32, "source": "synthetic <seed 0>",
        "fingerprint": "cafe", "created": "2026-01-01T00:00:00Z",
        "splits": {"tr": {"tiles": 10, "scenes": ["a", "b"], "class_pixels": [5, 10, 20] + [1] * 22},
                   "va": {"tiles": 2, "scenes": ["c"]}},
        "normalizer": {"mean": [100.0] * 32, "std": [10.0] * 32},
        "band_stats": {"split": "tr"},
    }  # fmt: skip
    dataset = SimpleNamespace(  # what the sections read of a ShardDataset; no tiles in it
        manifest=manifest,
        normalizer=SimpleNamespace(fingerprint=fp),
        splits={},
        uri="file:///store/datasets/whu-ohs",
    )
    references = [{"name": "majority", "class_id": 2, "class_name": "paddy field",
                   "eval_split": "ts", "train_split": "tr", "tile": {"miou": 0.01, "macc": 0.04, "oa": 0.3},
                   "scene": {"miou": 0.012, "macc": 0.04, "oa": 0.31}}]  # fmt: skip
    return ReportInputs(None, dataset.uri, dataset, results, encoders,
                        ["a problem & <its> reason"], references)  # fmt: skip
