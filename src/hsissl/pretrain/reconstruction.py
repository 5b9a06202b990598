"""A pretrained MAE with its pixel decoder, and its reconstruction of tiles under a seeded mask
(for the report's figures and the PCA proof of concept's 32-band check)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hsissl.data.normalize import Normalizer
from hsissl.pretrain.checkpoint import load_model


@dataclass(frozen=True)
class TrainedMAE:
    model: nn.Module  # hsissl.models.mae.MaskedAutoencoderViT, eval mode
    mask_ratio: float  # the ratio the run was trained with
    step: int  # of the training state the weights come from
    factory: str  # its hsissl.models factory
    normalizer: Normalizer  # the run's


def load_mae(uri: str, device: str | torch.device = "cpu") -> TrainedMAE:
    """The whole MAE of the run whose encoder record is ``uri`` (the decoder lives in the
    training state ``train.pt`` beside it), on ``device``."""
    model, normalizer, state = load_model(uri, whole=True)
    if state.get("method") != "mae":
        raise ValueError(f"{uri}: a {state.get('method')!r} run; expected an MAE")
    mask_ratio = float(state["config"]["mae"]["mask_ratio"])
    factory = state["build"]["factory"]
    return TrainedMAE(model.to(device), mask_ratio, int(state["step"]), factory, normalizer)


@torch.no_grad()
def reconstruct(
    model: nn.Module, x: torch.Tensor, mask_ratio: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE reconstruction of normalised tiles x (B, C, T, T) with the visible patches pasted
    back, and its mask (B, 1, T, T), 1 = masked. The mask is seeded: every caller with the
    same seed checks the same patches."""
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(seed)  # random_masking draws from the global generator
        latent, mask, ids_restore = model.forward_encoder(x, mask_ratio)  # mask (B, L)
    pred = model.forward_decoder(latent, ids_restore).float()  # (B, L, p*p*C)
    if model.norm_pix_loss:  # predictions are per-patch standardised: undo with the target's stats
        target = model.patchify(x)
        mu, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    p = model.patch_size
    mask_px = model.unpatchify(mask[..., None].expand(-1, -1, p * p * model.in_chans))[:, :1]
    return model.unpatchify(pred) * mask_px + x * (1 - mask_px), mask_px
