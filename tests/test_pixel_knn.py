"""The k-NN monitor of labelled pixels that evaluate-real's pretraining logs (hsissl.segment.pixel_knn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hsissl.pretrain.knn import knn_vote
from hsissl.segment.pixel_knn import METRIC, PixelKNN


class PooledSpectrum(nn.Module):
    """An 'encoder' whose patch maps are the 2x2-pooled input (a feature that separates
    classes with distinct spectra) or, with ``blind``, a constant (one that separates nothing)."""

    def __init__(self, blind: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.blind = blind

    def get_intermediate_layers(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        maps = F.avg_pool2d(x, 2) * self.scale  # (N, 32, h, w)
        return [torch.ones_like(maps) if self.blind else maps] * n


def _three_class_scene() -> tuple[torch.Tensor, np.ndarray]:
    """(32, 72, 72) noisy spectra of three classes in 8-px blocks, (72, 72) labels 1..3."""
    rng = np.random.default_rng(0)
    label = np.repeat(np.repeat(rng.integers(1, 4, (9, 9)), 8, 0), 8, 1).astype(np.uint8)
    ramp = torch.linspace(-1, 1, 32)
    shapes = torch.stack([ramp, -ramp, 1 - 2 * ramp.abs()])  # (3, 32): up, down, a peak
    image = shapes[torch.from_numpy(label.astype(np.int64)) - 1].permute(2, 0, 1)  # (32, H, W)
    return (
        image + 0.2 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    ), label


def test_knn_vote_takes_the_weighted_majority_of_the_nearest():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([3, 3, 1])
    queries = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn_vote(bank, labels, queries, k=2).tolist() == [3, 1]
    # k = 3: one close neighbour outweighs two far ones (weights exp(sim / 0.07)) ...
    assert knn_vote(bank, labels, queries, k=3).tolist() == [3, 1]
    # ... while two neighbours as close as the third outvote it
    assert knn_vote(bank, labels, F.normalize(torch.ones(1, 2), dim=1), k=3).tolist() == [3]


@pytest.mark.parametrize("blind", [False, True])
def test_pixel_knn_scores_features_that_separate_the_classes(blind):
    image, label = _three_class_scene()
    probe = PixelKNN([(image, label), (image.flip(-1), label[:, ::-1].copy())], block=8,
                     fraction=0.2, seed=0, stride=8, k=5)  # fmt: skip
    scores = probe(PooledSpectrum(blind).eval())
    assert set(scores) == {METRIC}
    if blind:  # every pixel gets the same vote: one class right at best
        assert scores[METRIC] < 0.5
    else:
        assert scores[METRIC] > 0.9


def test_pixel_knn_skips_a_scene_without_training_or_test_pixels():
    image, label = _three_class_scene()
    probe = PixelKNN([(image, np.zeros_like(label))], block=8, fraction=0.2, seed=0, stride=8, k=5)
    assert probe(PooledSpectrum()) == {}
