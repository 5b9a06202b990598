"""MAE pixel-reconstruction loss over masked patches."""

from __future__ import annotations

import torch


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    Args:
        pred: (B, L, P) reconstructed patches (P = values per patch).
        target: (B, L, P) true patches.
        mask: (B, L), 1 = masked (reconstructed and scored), 0 = visible (ignored).
        norm_pix: normalise each target patch to zero mean / unit variance first
            (MAE's normalised-pixel target; eps 1e-6, unbiased variance as in MAE).

    Returns 0 when no patch is masked.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"mae_loss: pred and target must both be (B, L, P), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if mask.shape != pred.shape[:2]:
        raise ValueError(
            f"mae_loss: mask must be (B, L) = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}"
        )
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)
