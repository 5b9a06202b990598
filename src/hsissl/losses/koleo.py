"""KoLeo regulariser (Kozachenko-Leonenko entropy estimator, dinov2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """-mean(log(d_nn + eps)) over L2-normalised features.

    d_nn is each feature's distance to its nearest other feature in the batch.
    Minimising it spreads features uniformly over the unit sphere.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) features, B >= 2 -> scalar loss."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss: features must be (B, D) with B >= 2, got {tuple(features.shape)}"
            )
        x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)  # (B, D)
        with torch.no_grad():
            # On the unit sphere the largest inner product is the nearest neighbour.
            sims = x @ x.t()  # (B, B)
            sims.fill_diagonal_(float("-inf"))  # exclude self
            nn_idx = sims.argmax(dim=1)  # (B,)
        nn_dist = torch.linalg.vector_norm(x - x[nn_idx], dim=-1)  # (B,)
        return -torch.log(nn_dist + self.eps).mean()
