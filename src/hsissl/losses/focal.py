"""Focal loss for semantic segmentation (Lin et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Multi-class focal loss: -w[y] * (1 - p_y)^gamma * log p_y, weighted mean over pixels.

    Label convention (WHU-OHS): labels are the raw class ids 0..24 with 0 =
    unlabelled. The logits therefore have NUM_CLASSES + 1 = 25 channels, channel
    c scoring class c; channel 0 is never a target because pixels labelled 0 are
    ignored (ignore_index=0). At inference take argmax over channels 1..24.

    With gamma=0 this equals F.cross_entropy(logits, labels, weight, ignore_index)
    (mean reduction weighted by w[y]); unlike it, a batch with no labelled pixel
    gives 0 instead of NaN.

    Args:
        gamma: focusing exponent; 0 gives plain cross-entropy.
        weight: optional (C,) per-class weights.
        ignore_index: label value excluded from the loss; None to score every pixel.
    """

    weight: torch.Tensor | None

    def __init__(
        self,
        gamma: float = 2.0,
        weight: torch.Tensor | None = None,
        ignore_index: int | None = 0,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"FocalLoss: gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.register_buffer(
            "weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) logits and (B, H, W) integer labels -> scalar loss."""
        if logits.ndim != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"FocalLoss: expected logits (B, C, H, W) and labels (B, H, W), got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        n_classes = logits.shape[1]
        if self.weight is not None and self.weight.shape != (n_classes,):
            raise ValueError(
                f"FocalLoss: weight must have one entry per logit channel ({n_classes}), "
                f"got shape {tuple(self.weight.shape)}"
            )
        labels = labels.long()
        if self.ignore_index is None:
            valid = torch.ones_like(labels, dtype=torch.bool)
        else:
            valid = labels != self.ignore_index  # (B, H, W)
        if valid.any():
            lo, hi = int(labels[valid].min()), int(labels[valid].max())
            if lo < 0 or hi >= n_classes:
                raise ValueError(
                    f"FocalLoss: labels must lie in [0, {n_classes - 1}] for {n_classes} logit "
                    f"channels, found values in [{lo}, {hi}]"
                )
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))  # any in-range index
        log_probs = F.log_softmax(logits.float(), dim=1)  # (B, C, H, W)
        log_p_true = log_probs.gather(1, safe_labels.unsqueeze(1)).squeeze(1)  # (B, H, W)
        p_true = log_p_true.exp()
        focal = (1.0 - p_true).clamp(min=0.0) ** self.gamma
        pixel_weight = valid.float()
        if self.weight is not None:
            pixel_weight = pixel_weight * self.weight[safe_labels]
        loss_sum = -(focal * log_p_true * pixel_weight).sum()
        return loss_sum / pixel_weight.sum().clamp(min=torch.finfo(torch.float32).tiny)
