"""Spatially disjoint train/test splits of one scene: whole square blocks go to one side."""

from __future__ import annotations

import numpy as np


def block_split(shape: tuple[int, int], block: int, train_fraction: float, seed: int) -> np.ndarray:
    """(H, W) bool mask of training pixels: ``round(train_fraction * blocks)`` random blocks (>= 1).

    Blocks are ``block`` x ``block`` squares on a grid from the top-left corner (edge blocks
    are smaller); training and test pixels never share a block, so neighbouring, nearly
    identical pixels cannot leak from one side to the other.
    """
    if block < 1 or not 0 < train_fraction < 1:
        raise ValueError(
            f"block must be >= 1 and 0 < train_fraction < 1, got {block}, {train_fraction}"
        )
    h, w = shape
    by, bx = -(-h // block), -(-w // block)
    n = by * bx
    chosen = np.random.default_rng(seed).permutation(n)[: max(1, round(train_fraction * n))]
    grid = np.zeros(n, dtype=bool)
    grid[chosen] = True
    full = np.repeat(np.repeat(grid.reshape(by, bx), block, axis=0), block, axis=1)
    return full[:h, :w]


def protocol_split(
    label: np.ndarray, block: int, train_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) pixel masks of a labelled (H, W) scene (0 = unlabelled, in neither):
    the labelled pixels of the :func:`block_split` blocks train, those of the others test."""
    split = block_split(label.shape, block, train_fraction, seed)
    labelled = label > 0
    return split & labelled, ~split & labelled
