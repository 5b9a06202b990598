"""Shared fixtures. Loopback services live in conftest_s3 / conftest_mlflow."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hsissl.config import Config, load_config
from hsissl.data.geotiff import default_transform, write_image, write_label

pytest_plugins = ["conftest_mlflow", "conftest_s3"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HSISSL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real scenes not found at {SHARED_DATA} (set HSISSL_SHARED_DATA)")
    return SHARED_DATA


def write_whu_layout(root: Path, scenes: dict[str, int], size: int = 128, seed: int = 0) -> Path:
    """A small random dataset in the WHU-OHS layout (valid by construction)."""
    rng = np.random.default_rng(seed)
    index = 0
    for split, count in scenes.items():
        for _ in range(count):
            name = f"T{index:04d}.tif"
            image = rng.integers(0, 10000, size=(32, size, size), dtype=np.int16)
            label = rng.integers(0, 25, size=(size, size), dtype=np.uint8)
            transform = default_transform(index, size)
            write_image(root / split / "image" / name, image, transform)
            write_label(root / split / "label" / name, label, transform)
            index += 1
    return root


@pytest.fixture
def whu_root(tmp_path: Path) -> Path:
    return write_whu_layout(tmp_path / "whu", {"tr": 3, "va": 1, "ts": 1})


@pytest.fixture
def tiny_cfg(tmp_path: Path, whu_root: Path) -> Config:
    """Config ingesting ``whu_root`` into a store under tmp_path (sqlite MLflow there too)."""
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [f"run_dir={tmp_path / 'run'}", f"data.source={whu_root}", "data.scene_size=128",
         "data.shard_tiles=5", "tracking.uri="],
    )  # fmt: skip


def small_run_settings(run_dir: Path) -> dict[str, object]:
    """Settings of a small end-to-end run on generated data (3 + 1 + 1 scenes of 128 px,
    4 pretraining and 4 finetune steps, no MLflow): tests add or change keys, then pass
    ``[f"{k}={v}" ...]`` as overrides."""
    return {
        "run_dir": run_dir,
        "synthetic.scenes": "{tr: 3, va: 1, ts: 1}",
        "synthetic.size": 128,
        "data.scene_size": 128,
        "tracking.uri": "",
        "pretrain.batch_size": 8,
        "pretrain.max_steps": 4,
        "pretrain.log_every": 1,
        "pretrain.knn_tiles": 8,
        "pretrain.loader_threads": 1,
        "finetune.head": "linear",
        "finetune.max_steps": 4,
        "finetune.batch_size": 8,
        "finetune.loader_threads": 1,
    }
