"""Whole-scene evaluation by sliding window.

Models see fixed-size tiles; a scene is cut on the :func:`hsissl.data.tiling.tile_positions`
grid (last window flush with the edge, so every pixel is covered), windows run in batches,
and overlapping logits are averaged. With ``stride < tile`` each pixel gets several views,
which smooths the seams between windows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hsissl.data.tiling import tile_positions

ModelFn = Callable[[torch.Tensor], torch.Tensor]  # (N, C, T, T) -> (N, K, T, T) logits


@torch.no_grad()
def predict_scene(
    model_fn: ModelFn,
    image: torch.Tensor,
    tile: int = 64,
    stride: int = 64,
    num_classes: int = 25,
    batch_size: int = 64,
) -> torch.Tensor:
    """Stitched logits for whole scenes: (C, H, W) or (B, C, H, W) -> (B, K, H, W), K = num_classes.

    ``model_fn`` maps (N, C, tile, tile) windows to (N, num_classes, tile, tile) logits; windows
    from all B scenes share batches of up to ``batch_size``. Overlaps are averaged with a
    running mean (mean += (x - mean) / n), so a pointwise model gives exactly what it gives
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
    b, _, h, w = image.shape
    windows = [(i, y, x) for i in range(b) for (y, x) in tile_positions(h, w, tile, stride)]

    mean: torch.Tensor | None = None  # (B, K, H, W), created once the output dtype is known
    count = torch.zeros(b, 1, h, w, dtype=torch.float32, device=image.device)  # views per pixel
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
            count[region] += 1
            mean[region] += (out - mean[region]) / count[region]
    assert mean is not None  # tile_positions never returns an empty grid
    return mean


def predict_labels(
    model_fn: ModelFn,
    image: torch.Tensor,
    tile: int = 64,
    stride: int = 64,
    num_classes: int = 25,
    batch_size: int = 64,
) -> torch.Tensor:
    """Argmax class map of :func:`predict_scene`: (C, H, W) or (B, C, H, W) -> (B, H, W) int64."""
    logits = predict_scene(model_fn, image, tile, stride, num_classes, batch_size)
    return logits.argmax(dim=1)
