"""Online k-NN probe: is the representation separating land-cover classes yet?"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hsissl.data.normalize import Normalizer
from hsissl.data.shards import SplitView


def tile_labels(labels: np.ndarray) -> np.ndarray:
    """Majority labelled class per (N, T, T) tile; 0 where a tile has no labelled pixel."""
    counts = np.stack([np.bincount(t.ravel(), minlength=25)[1:] for t in labels])  # (N, 24)
    return np.where(counts.sum(1) > 0, counts.argmax(1) + 1, 0)


def sample(split: SplitView, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to n random tiles that have a labelled majority class: (int16 tiles, class ids)."""
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[: n * 2])
    images, labels = split.get(idx)
    y = tile_labels(labels)
    keep = np.nonzero(y > 0)[0][:n]
    return images[keep], y[keep]


@torch.no_grad()
def knn_vote(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int
) -> torch.Tensor:
    """Class ids (Q,) of a cosine k-NN vote, weights exp(sim / 0.07) as in DINO: unit-norm
    (N, D) bank features with (N,) class ids, unit-norm (Q, D) query features."""
    sim, nn_idx = (queries @ bank.T).topk(min(k, len(bank)), dim=1)  # (Q, k)
    votes = torch.zeros(len(queries), int(bank_labels.max()) + 1, device=queries.device)
    votes.scatter_add_(1, bank_labels[nn_idx], (sim.float() / 0.07).exp())
    return votes.argmax(1)


@torch.no_grad()
def knn_accuracy(embed: Callable[[torch.Tensor], torch.Tensor], normalizer: Normalizer,
                 bank: tuple[np.ndarray, np.ndarray], queries: tuple[np.ndarray, np.ndarray],
                 k: int, device: torch.device, batch: int = 256) -> float:  # fmt: skip
    """Tile-classification accuracy of a cosine k-NN vote (:func:`knn_vote`)."""

    def features(images: np.ndarray) -> torch.Tensor:
        out = [embed(normalizer(torch.from_numpy(images[i : i + batch]).to(device))).float()
               for i in range(0, len(images), batch)]  # fmt: skip
        return F.normalize(torch.cat(out), dim=1)

    if len(bank[0]) == 0 or len(queries[0]) == 0:
        return float("nan")
    yb = torch.from_numpy(bank[1]).to(device)
    pred = knn_vote(features(bank[0]), yb, features(queries[0]), k).cpu().numpy()
    return float((pred == queries[1]).mean())
