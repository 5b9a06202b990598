"""A segmentation head trained on one small scene, on a frozen encoder (real-data evaluation).

The shared real scenes are only a few 64-px windows large, so the frozen encoder runs once
over the windows of the scene's 8 dihedral views (free augmentation), the patch maps are
cached, and the head (one of :data:`hsissl.models.heads.HEADS`, built as the finetune stage
builds it) trains on batches of cached maps. Prediction is the finetune stage's sliding window
over the scene as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hsissl.config import FinetuneConfig
from hsissl.data.tiling import tile_positions
from hsissl.segment.finetune import build_head, head_spec, poly_lr
from hsissl.segment.sliding import predict_scene


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations/flips of (..., H, W), identity first (odd rotations swap H and W)."""
    rotations = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return rotations + [r.flip(-1) for r in rotations]


@dataclass(frozen=True)
class SceneWindows:
    """The ``tile``-px windows of every dihedral view of a scene, on the sliding-window grid."""

    tile: int = 64
    stride: int = 16

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H, W) -> (N, ..., tile, tile), views in :func:`dihedral_views` order, rows first."""
        windows = []
        for view in dihedral_views(x):
            h, w = view.shape[-2:]
            for y, x0 in tile_positions(h, w, self.tile, self.stride):
                windows.append(view[..., y : y + self.tile, x0 : x0 + self.tile])
        return torch.stack(windows)


@torch.no_grad()
def window_features(
    encoder: nn.Module, windows: torch.Tensor, n_blocks: int, batch_size: int = 64
) -> list[torch.Tensor]:
    """Frozen-encoder patch maps of (N, C, T, T) windows: n_blocks x (N, D, h, w)."""
    chunks = [
        encoder.get_intermediate_layers(windows[i : i + batch_size], n=n_blocks)
        for i in range(0, len(windows), batch_size)
    ]
    return [torch.cat([c[b] for c in chunks]) for b in range(n_blocks)]


def train_scene_head(
    encoder: nn.Module,
    head_name: str,
    image: torch.Tensor,
    target: np.ndarray,
    *,
    feats: list[torch.Tensor] | None = None,
    windows: SceneWindows = SceneWindows(),  # noqa: B008 - frozen dataclass, never mutated
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    ft: FinetuneConfig | None = None,
    on_step: Callable[[], object] | None = None,
) -> np.ndarray:
    """Train head ``head_name`` on the labelled pixels of one scene; return its (H, W) class map.

    ``image`` is the normalised scene (C, H, W); ``target`` (H, W) holds the training labels
    (0 elsewhere: ignored). ``feats`` are the cached :func:`window_features` of
    ``windows.cut(image)`` (computed here when None; pass them to reuse across splits).
    Class 0 ("unlabelled") is never predicted. ``on_step`` is called after every optimiser
    step (progress bars).
    """
    ft = replace(ft or FinetuneConfig(), head=head_name)
    encoder = encoder.eval()
    if feats is None:
        feats = window_features(encoder, windows.cut(image), ft.n_blocks)
    labels = windows.cut(torch.from_numpy(target.astype(np.int64)))  # (N, T, T)
    if labels.shape[0] != feats[0].shape[0]:
        raise ValueError(f"{labels.shape[0]} target windows but {feats[0].shape[0]} feature maps: "
                         f"feats must come from windows.cut(image) with the same windows")  # fmt: skip
    useful = (labels > 0).flatten(1).any(1).nonzero().squeeze(1)  # windows with a training pixel
    if len(useful) == 0:
        raise ValueError("target has no labelled pixel inside any window: nothing to train on")
    torch.manual_seed(seed)
    spec = head_spec(encoder, ft, bands=image.shape[0], tile=windows.tile)
    head = build_head(spec)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=ft.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = poly_lr(step, steps, lr, ft.poly_power)
        idx = useful[torch.randint(len(useful), (min(batch_size, len(useful)),), generator=gen)]
        logits = head([f[idx] for f in feats])  # (B, K, T, T)
        loss = F.cross_entropy(logits, labels[idx], ignore_index=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step()
    head.eval()

    @torch.no_grad()
    def model_fn(batch: torch.Tensor) -> torch.Tensor:  # (N, C, T, T) -> (N, K, T, T)
        return head(list(encoder.get_intermediate_layers(batch, n=ft.n_blocks)))

    logits = predict_scene(model_fn, image, tile=windows.tile, stride=windows.stride,
                           num_classes=spec["num_classes"])[0]  # fmt: skip
    logits[0] = -torch.inf  # never predict "unlabelled"
    return logits.argmax(0).numpy()
