"""What a pretraining method plugs into the shared trainer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hsissl.config import Config

# Parameters that are never weight-decayed, besides biases and norm weights (ndim <= 1).
NO_DECAY = ("pos_embed", "cls_token", "reg_token", "mask_token", "spectral_pos_embed")


class Recipe(nn.Module):
    """All modules of one method (student, teacher, heads); ``forward`` is one training step.

    ``forward(images, step, total) -> (loss, logs)`` takes normalised (B, C, H, W) float
    tiles; ``logs`` are detached scalar tensors (loss terms, collapse monitors) that the
    trainer turns into floats only when it logs, so a step never waits for the GPU. Randomness uses
    torch's global generator, which the trainer checkpoints, so resumption is exact.
    """

    method: str = ""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    def after_step(self, step: int, total: int) -> dict[str, float]:
        """Called after the optimiser step (EMA teacher updates); returns extra logs."""
        return {}

    def encoder(self) -> nn.Module:
        """The backbone that later stages use (saved in the encoder record)."""
        raise NotImplementedError

    def build(self) -> dict[str, Any]:
        """How to rebuild :meth:`encoder`: {"factory", "kwargs", "attr"} for hsissl.models."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) image embedding for the k-NN probe: CLS ++ mean patch token."""
        tokens = self.encoder().forward_features(x)  # (B, N, D)
        if isinstance(tokens, dict):
            tokens = tokens["spatial"]
        prefix = getattr(self.encoder(), "num_prefix_tokens", 1)
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY)
            (no_decay if plain else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
