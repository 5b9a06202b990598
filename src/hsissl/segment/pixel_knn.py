"""A k-NN probe of labelled pixels during pretraining: do the frozen features separate classes yet?

evaluate-real's scenes have no validation tiles for the trainer's tile k-NN, so this probe
classifies each scene's test pixels of one block split (``hsissl.segment.blocks``) by a cosine
k-NN vote over its training pixels, on the encoder's per-pixel features (``pixel_features``),
and logs the mean mIoU over scenes as ``knn_pixel_miou``. It is a monitor: nothing is chosen by
it (no early stopping, no selection), so the test pixels it reads cannot leak into a result.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hsissl.pretrain.knn import knn_vote
from hsissl.segment.blocks import protocol_split
from hsissl.segment.real_eval import miou, pixel_features

METRIC = "knn_pixel_miou"


class PixelKNN:
    """``probe(encoder) -> {"knn_pixel_miou": mean over scenes}`` (a trainer ``Probe``)."""

    def __init__(self, scenes: list[tuple[torch.Tensor, np.ndarray]], block: int, fraction: float,
                 seed: int, stride: int, k: int) -> None:  # fmt: skip
        """``scenes``: ((32, H, W) normalised image, (H, W) labels) pairs; the split is the
        evaluation's own (``block``, ``fraction``, ``seed``)."""
        self.scenes = [
            (x, label, *protocol_split(label, block, fraction, seed)) for x, label in scenes
        ]
        self.stride, self.k = stride, k

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        device = next(encoder.parameters()).device
        scores = []
        for x, label, train, test in self.scenes:
            if not train.any() or not test.any():
                continue
            feats = pixel_features(encoder, x.to(device), self.stride).float()  # (D, H, W)
            feats = F.normalize(feats.flatten(1).T, dim=1)  # (H*W, D)
            bank = torch.from_numpy(label[train].astype(np.int64)).to(device)  # (N,)
            pred = np.zeros_like(label)
            train_rows, test_rows = (torch.from_numpy(m.ravel()).to(device) for m in (train, test))
            pred[test] = knn_vote(feats[train_rows], bank, feats[test_rows], self.k).cpu().numpy()
            scores.append(miou(pred, label, test))
        return {METRIC: float(np.mean(scores))} if scores else {}
