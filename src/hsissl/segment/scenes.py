"""Whole scenes back from tile shards, and RGB composites for showing them.

Shards store the tiles of scene ``i`` of a split with ``sources[:, 0] == i`` and their top-left
corners in ``sources[:, 1:]``; putting them back with :func:`hsissl.data.tiling.untile` gives the
scene. Tiles dropped at ingest (``data.drop_unlabelled``) held no labelled pixel, so their place
is filled with zeros (label 0 = unlabelled, ignored by every metric).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hsissl.data.ohs import RGB_BANDS
from hsissl.data.shards import ShardDataset, SplitView
from hsissl.data.tiling import tile_positions, untile

SHOWN_SCENES = 3  # scenes kept in predictions.npz for the report (finetune and baseline)


@dataclass(frozen=True)
class Scene:
    name: str  # file stem of the scene in the source layout
    index: int  # position in the split's scene list
    image: np.ndarray  # (C, H, W) int16, stored units
    label: np.ndarray  # (H, W) uint8, 0 = unlabelled


def scene_size(dataset: ShardDataset, view: SplitView, index: int) -> tuple[int, int]:
    """(H, W) of scene ``index``: the ingest's fixed ``scene_size``, else its tiles' extent."""
    fixed = dataset.manifest.get("config", {}).get("scene_size")
    if fixed:
        return int(fixed), int(fixed)
    tile = view.images[0].shape[-1]
    corners = view.sources[view.sources[:, 0] == index, 1:]  # (n, 2) y, x
    if len(corners) == 0:
        raise ValueError(f"{dataset.uri}: split {view.name!r} has no tiles of scene {index}")
    return int(corners[:, 0].max()) + tile, int(corners[:, 1].max()) + tile


def load_scene(dataset: ShardDataset, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split`` reassembled from its tiles."""
    view = dataset.split(split)
    if not 0 <= index < len(view.scenes):
        raise IndexError(
            f"{dataset.uri}: split {split!r} has {len(view.scenes)} scenes; asked for scene {index}"
        )
    rows = np.nonzero(view.sources[:, 0] == index)[0]
    images, labels = view.get(rows)  # (n, C, T, T), (n, T, T)
    positions = [(int(y), int(x)) for y, x in view.sources[rows, 1:]]
    height, width = scene_size(dataset, view, index)
    tile = images.shape[-1] if len(images) else view.images[0].shape[-1]
    stride = int(dataset.manifest.get("stride", tile))
    missing = sorted(set(tile_positions(height, width, tile, stride)) - set(positions))
    if missing:  # dropped all-unlabelled tiles: zeros in their place
        bands = view.images[0].shape[1]
        images = np.concatenate([np.zeros((len(missing), bands, tile, tile), np.int16), images])
        labels = np.concatenate([np.zeros((len(missing), tile, tile), np.uint8), labels])
        positions = missing + positions  # kept tiles come later, so they win on overlap
    return Scene(
        view.scenes[index],
        index,
        untile(images, positions, height, width),
        untile(labels, positions, height, width),
    )


def iter_scenes(dataset: ShardDataset, split: str, limit: int = 0) -> Iterator[Scene]:
    """The scenes of ``split`` in order, one at a time; ``limit`` > 0 stops after that many."""
    count = len(dataset.split(split).scenes)
    for index in range(min(count, limit) if limit > 0 else count):
        yield load_scene(dataset, split, index)


def rgb_composite(
    image: np.ndarray,
    bands: tuple[int, int, int] = RGB_BANDS,
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> np.ndarray:
    """(C, H, W) image -> (H, W, 3) uint8 from ``bands`` (red, green, blue), each stretched
    linearly between its own 2nd and 98th percentile over the scene."""
    if image.ndim != 3 or max(bands) >= image.shape[0]:
        raise ValueError(
            f"rgb_composite expects (C, H, W) with C > {max(bands)}, got shape {image.shape}"
        )
    rgb = image[list(bands)].astype(np.float32)  # (3, H, W)
    lo, hi = np.percentile(rgb.reshape(3, -1), percentiles, axis=1)  # (3,) each
    scaled = (rgb - lo[:, None, None]) / np.maximum(hi - lo, 1e-6)[:, None, None]
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8).transpose(1, 2, 0)
