"""What a pretraining method plugs into the shared trainer."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from hsissl import methods
from hsissl.config import Config
from hsissl.models.dinov2 import DINOHead
from hsissl.models.ssvit import SpatialSpectralBlock

# Parameters that are never weight-decayed, besides biases and norm weights (ndim <= 1).
NO_DECAY = ("pos_embed", "cls_token", "reg_token", "mask_token", "spectral_pos_embed")
COMPILE_SCOPES = ("networks", "blocks")
# What scope "blocks" compiles: repeated transformer blocks (static shapes) and DINO heads
# (dynamic row count: the number of masked tokens changes every step).
STATIC_BLOCKS: tuple[type[nn.Module], ...] = (SpatialSpectralBlock, Block)
DYNAMIC_BLOCKS: tuple[type[nn.Module], ...] = (DINOHead,)


class Recipe(nn.Module):
    """All modules of one method (student, teacher, heads); ``forward`` is one training step.

    ``forward(images, step, total) -> (loss, logs)`` takes normalised (B, C, H, W) float
    tiles; ``logs`` are detached scalar tensors (loss terms, collapse monitors) that the
    trainer turns into floats only when it logs, so a step never waits for the GPU. Randomness uses
    torch's global generator, which the trainer checkpoints, so resumption is exact.
    """

    method: str = ""  # its name in hsissl.methods (and its config section)
    static_shapes: bool = False  # every compiled network sees one shape (CUDA graphs can replay)

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    def default_model(self) -> str:
        """The model factory used when the method's ``model`` key is "" (hsissl.methods)."""
        return methods.get(self.method).default_model

    def after_step(self, step: int, total: int) -> dict[str, float]:
        """Called after the optimiser step (EMA teacher updates); returns extra logs."""
        return {}

    def compile_modules(self, scope: str = "networks", **options: Any) -> None:
        """torch.compile the compute-heavy modules in place; ``options`` go to ``torch.compile``.

        scope "networks": each network (backbone, head, MAE model) as one full graph, via
        :meth:`compile_networks`; the step's Python around them (augmentations, CPU-drawn
        masks, losses) stays eager, since compiled whole the step graph-breaks there.
        scope "blocks": only the repeated transformer blocks and the DINO heads, one graph per
        block kind and shape shared by all blocks (regional compilation): a fraction of the
        compile time, for short runs such as benchmarks on lent GPUs. Both scopes then compile the
        loss kernels (:meth:`compile_loss_kernels`).
        Parameters and ``state_dict`` keys are unchanged, so checkpoints are unaffected.
        """
        if scope == "networks":
            self.compile_networks(**options)
        elif scope == "blocks":
            compile_blocks(self, **options)
        else:
            raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
        self.compile_loss_kernels(**options)

    def compile_loss_kernels(self, **options: Any) -> None:
        """Compile the loss's heavy kernels (in either scope); recipes with such kernels override."""

    def compile_networks(self, **options: Any) -> None:
        """Compile each network on its own (recipes override this); by default the whole step."""
        self.compile(**options)

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


def compile_blocks(root: nn.Module, **options: Any) -> int:
    """Compile, in place, every outermost :data:`STATIC_BLOCKS` / :data:`DYNAMIC_BLOCKS` module
    under ``root``; returns how many. Same-kind blocks share their compiled graph."""
    done: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(f"{d}.") for d in done):
            continue  # inside a block compiled already (the SS-ViT's spatial/spectral blocks)
        if isinstance(module, STATIC_BLOCKS + DYNAMIC_BLOCKS):
            module.compile(**{"dynamic": isinstance(module, DYNAMIC_BLOCKS), **options})
            done.append(name)
    return len(done)


def set_checkpoint_blocks(root: nn.Module, n: int) -> int:
    """Let every backbone under ``root`` recompute its first ``n`` blocks in backward (the
    ``checkpoint_blocks`` attribute of HsiViT and SpatialSpectralViT); returns how many."""
    backbones = [m for m in root.modules() if hasattr(m, "checkpoint_blocks")]
    for m in backbones:
        m.checkpoint_blocks = n
    return len(backbones)
