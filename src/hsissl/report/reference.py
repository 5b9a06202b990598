"""The chance reference of the results table: predict the train split's most common class.

Computed from the dataset manifest's per-split class pixel counts (no model, no pixels read),
through the same :class:`ConfusionMatrix` the runs are scored with, so absent classes count
the same way (left out of the means) and the numbers compare with the runs' rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hsissl.data.ohs import CLASS_NAMES, IGNORE_INDEX
from hsissl.segment.metrics import ConfusionMatrix

REFERENCE_NAME = "most common class (train split)"
TRAIN_SPLIT = "tr"
DEFAULT_EVAL_SPLIT = "ts"  # finetune.eval_split / baseline.eval_split default


def majority_reference(
    manifest: dict[str, Any], eval_split: str, train_split: str = TRAIN_SPLIT
) -> dict[str, Any]:
    """Metrics (metrics.json layout) of predicting the most frequent labelled class of
    ``train_split`` on every labelled pixel of ``eval_split``.

    ``tile`` holds the result over the split's tiles (what tile metrics count); ``scene`` the
    same when the manifest's tiling stride equals the tile size (the tiles then cover each
    scene exactly once), else ``{}`` (overlapping tiles count pixels more than once).
    OA is the class's share of the labelled pixels; mIoU its IoU (= that share) divided by
    the number of classes present in the split's ground truth or predicted.
    """
    counts = {s: _class_pixels(manifest, s) for s in (train_split, eval_split)}
    num_classes = int(manifest.get("num_classes") or len(counts[train_split]) - 1)
    cm = ConfusionMatrix(num_classes, IGNORE_INDEX)
    ids = cm.class_ids
    for split, pixels in counts.items():
        if len(pixels) != num_classes + 1:
            raise ValueError(
                f"manifest splits.{split}.class_pixels has {len(pixels)} entries; expected "
                f"{num_classes + 1} (num_classes {num_classes} + unlabelled)"
            )
    train = counts[train_split][ids]  # (K,) labelled classes only
    if train.sum() == 0:
        raise ValueError(f"manifest splits.{train_split}.class_pixels: no labelled pixel")
    majority = ids[int(np.argmax(train))]
    matrix = torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.int64)  # (t, p)
    matrix[ids, majority] = torch.from_numpy(counts[eval_split][ids])  # every pixel -> majority
    cm.load_state_dict({"num_classes": num_classes, "ignore_index": IGNORE_INDEX, "matrix": matrix})
    result = cm.compute()
    names = manifest.get("class_names") or CLASS_NAMES
    tiles_cover_scenes = manifest.get("stride") == manifest.get("tile_size")
    return {
        "name": REFERENCE_NAME,
        "kind": "reference",
        "class_id": majority,
        "class_name": names[majority] if majority < len(names) else f"class {majority}",
        "train_split": train_split,
        "eval_split": eval_split,
        "tile": result,
        "scene": result if tiles_cover_scenes else {},
    }


def eval_split_of(metrics: dict[str, Any]) -> str:
    """The split a finetune/baseline run was scored on (its saved config's ``eval_split``)."""
    config = metrics.get("config")
    split = config.get("eval_split") if isinstance(config, dict) else None
    return str(split or DEFAULT_EVAL_SPLIT)


def references_for(
    manifest: dict[str, Any] | None, runs: Sequence[dict[str, Any]], problems: list[str]
) -> list[dict[str, Any]]:
    """One reference per eval split the ``runs`` used; what cannot be computed goes to
    ``problems`` (the report must not fail over it)."""
    if manifest is None or not runs:
        return []
    references = []
    for split in dict.fromkeys(eval_split_of(m) for m in runs):
        try:
            references.append(majority_reference(manifest, split))
        except Exception as exc:
            problems.append(f"chance reference for eval split {split!r}: {exc}")
    return references


def _class_pixels(manifest: dict[str, Any], split: str) -> np.ndarray:
    info = (manifest.get("splits") or {}).get(split)
    if not info or not info.get("class_pixels"):
        raise ValueError(
            f"manifest has no splits.{split}.class_pixels (splits present: "
            f"{sorted(manifest.get('splits') or {})})"
        )
    return np.asarray(info["class_pixels"], dtype=np.int64)  # (K+1,)
