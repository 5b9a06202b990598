"""Whole-scene evaluation by sliding window.

Models see fixed-size tiles; a scene is cut on the :func:`hsissl.data.tiling.tile_positions`
grid (last window flush with the edge, so every pixel is covered), windows run in batches,
and overlapping logits are blended. By default each window's logits are weighted by a
Gaussian importance map centred on the window (sigma = tile / 8, the nnU-Net and MONAI
``sliding_window_inference(mode="gaussian", sigma_scale=0.125)`` default): a window's border
pixels see the least context (zero padding, truncated receptive fields), so where windows
overlap the window in whose centre a pixel lies dominates, and the answer changes smoothly
from one window to the next instead of stepping at window borders. ``blend="uniform"`` is the
plain average. Either way, a pixel seen by one window gets exactly that window's answer.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from hsissl.data.tiling import tile_positions

ModelFn = Callable[[torch.Tensor], torch.Tensor]  # (N, C, T, T) -> (N, K, T, T) logits
BLENDS = ("gaussian", "uniform")
SIGMA_SCALE = 0.125  # Gaussian sigma as a share of the tile side (nnU-Net, MONAI)


@lru_cache(maxsize=8)
def importance_map(tile: int, blend: str = "gaussian") -> torch.Tensor:
    """(tile, tile) float32 weights of one window's pixels, 1 at the centre.

    ``gaussian``: exp(-d^2 / (2 sigma^2)) with sigma = SIGMA_SCALE * tile, separable; its
    minimum (the corners, ~1e-7 for any tile) stays well above float32's smallest normal
    number, so every pixel keeps a positive weight. ``uniform``: all ones.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend={blend!r}; expected one of {list(BLENDS)}")
    if blend == "uniform":
        return torch.ones(tile, tile)
    centre = (tile - 1) / 2
    sigma = SIGMA_SCALE * tile
    d = torch.arange(tile, dtype=torch.float64) - centre
    g = torch.exp(-(d**2) / (2 * sigma**2))
    g = g / g.max()
    return torch.outer(g, g).float()


@torch.no_grad()
def predict_scene(
    model_fn: ModelFn,
    image: torch.Tensor,
    tile: int = 64,
    stride: int = 64,
    num_classes: int = 25,
    batch_size: int = 64,
    blend: str = "gaussian",
) -> torch.Tensor:
    """Stitched logits for whole scenes: (C, H, W) or (B, C, H, W) -> (B, K, H, W), K = num_classes.

    ``model_fn`` maps (N, C, tile, tile) windows to (N, num_classes, tile, tile) logits; windows
    from all B scenes share batches of up to ``batch_size``. Overlaps are blended with the
    weights of :func:`importance_map` (``blend``) as a running weighted mean
    (W += w; mean += (x - mean) * (w / W)), so a pointwise model gives exactly what it gives
    on the whole scene. Logits come back on the image's device in at least float32.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)  # (1, C, H, W)
    if image.ndim != 4 or not image.is_floating_point():
        raise ValueError(
            f"image must be a float tensor (C, H, W) or (B, C, H, W), "
            f"got dtype {image.dtype} shape {tuple(image.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if stride > tile:
        raise ValueError(f"stride {stride} > tile {tile}: pixels between windows would get no view")
    b, _, h, w = image.shape
    windows = [(i, y, x) for i in range(b) for (y, x) in tile_positions(h, w, tile, stride)]
    weight = importance_map(tile, blend).to(image.device)  # (T, T)

    mean: torch.Tensor | None = None  # (B, K, H, W), created once the output dtype is known
    total = torch.zeros(b, 1, h, w, dtype=torch.float32, device=image.device)  # weight per pixel
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        batch = torch.stack([image[i, :, y : y + tile, x : x + tile] for i, y, x in chunk])
        logits = model_fn(batch)  # (N, K, T, T)
        expected = (len(chunk), num_classes, tile, tile)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"model_fn returned logits of shape {tuple(logits.shape)} for windows of shape "
                f"{tuple(batch.shape)}; expected {expected} (N, num_classes, tile, tile)"
            )
        if mean is None:
            dtype = torch.promote_types(logits.dtype, torch.float32)
            mean = torch.zeros(b, num_classes, h, w, dtype=dtype, device=image.device)
        logits = logits.to(device=mean.device, dtype=mean.dtype)
        for out, (i, y, x) in zip(logits, chunk, strict=True):
            region = (i, slice(None), slice(y, y + tile), slice(x, x + tile))
            total[region] += weight
            # w / W is exactly 1 for a pixel's first view, and x - mean exactly 0 for a view
            # that agrees with the mean so far: pointwise models stitch bit for bit.
            mean[region] += (out - mean[region]) * (weight / total[region]).to(mean.dtype)
    assert mean is not None  # tile_positions never returns an empty grid
    return mean


def predict_labels(
    model_fn: ModelFn,
    image: torch.Tensor,
    tile: int = 64,
    stride: int = 64,
    num_classes: int = 25,
    batch_size: int = 64,
    blend: str = "gaussian",
) -> torch.Tensor:
    """Argmax class map of :func:`predict_scene`: (C, H, W) or (B, C, H, W) -> (B, H, W) int64."""
    logits = predict_scene(model_fn, image, tile, stride, num_classes, batch_size, blend)
    return logits.argmax(dim=1)
