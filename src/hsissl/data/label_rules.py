"""How a source's label variable becomes an (H, W) uint8 label map on the image grid.

A sidecar names a rule (``label: {var: ..., rule: ...}``); each rule checks the shape it needs
and says what it found. Label IDs are kept as the source's own (not remapped to WHU-OHS).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# (raw label variable or None, (H, W) of the image grid) -> (H, W) uint8 label map.
LabelFn = Callable[[np.ndarray | None, tuple[int, int]], np.ndarray]


def labels_as_is(raw: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    """Ground truth already on the image grid (Indian Pines ``gt``)."""
    if raw is None or raw.shape != hw:
        found = None if raw is None else raw.shape
        raise ValueError(f"label map: found shape {found}, expected {hw} (the image grid)")
    return raw.astype(np.uint8)


def majority_downsample(raw: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    """Majority label of each (f x f) block, f = label size / image size (Houston: 512 -> 128).

    Unlabelled (0) votes like any class; ties go to the smallest ID, so a block split evenly
    between background and a class stays unlabelled (conservative).
    """
    if raw is None or raw.ndim != 2 or raw.shape[0] % hw[0] or raw.shape[1] % hw[1]:
        found = None if raw is None else raw.shape
        raise ValueError(f"label map: found shape {found}, expected a multiple of {hw}")
    fy, fx = raw.shape[0] // hw[0], raw.shape[1] // hw[1]
    blocks = raw.reshape(hw[0], fy, hw[1], fx).transpose(0, 2, 1, 3).reshape(-1, fy * fx)
    n_ids = int(raw.max()) + 1
    # Per-block histogram via offsets: block k's label l lands in bin k * n_ids + l.
    offsets = np.arange(blocks.shape[0])[:, None] * n_ids
    counts = np.bincount((blocks + offsets).ravel(), minlength=blocks.shape[0] * n_ids)
    return counts.reshape(-1, n_ids).argmax(axis=1).reshape(hw).astype(np.uint8)  # (H, W)


def abundance_argmax(raw: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    """Dominant endmember + 1 from an (H, W, K) abundance cube (Samson: 1 rock, 2 tree, 3 water)."""
    if raw is None or raw.ndim != 3 or raw.shape[:2] != hw:
        found = None if raw is None else raw.shape
        raise ValueError(f"abundances: found shape {found}, expected {hw} + (K,)")
    return (raw.argmax(axis=2) + 1).astype(np.uint8)


def all_unlabelled(raw: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    """No land-cover label (e.g. the ABU scenes' anomaly maps): every pixel is 0."""
    return np.zeros(hw, dtype=np.uint8)


# Sidecar ``label.rule`` -> function. "none" needs no label variable.
RULES: dict[str, LabelFn] = {
    "as_is": labels_as_is,
    "majority": majority_downsample,
    "abundance_argmax": abundance_argmax,
    "none": all_unlabelled,
}
