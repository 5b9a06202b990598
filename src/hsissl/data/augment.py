"""Batched augmentations for normalised hyperspectral tiles (B, C, H, W) on any device.

Every op treats all bands of a sample alike, so the spectral shape of a pixel (what tells the
classes apart) survives: no hue/saturation/grayscale, one brightness/contrast factor per sample.
Random parameters are drawn per sample from ``generator`` (on the generator's device, default
CPU: they are tiny) and moved to the data; the pixels never leave their device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.ops import roi_align

from hsissl.data.loaders import to_device

Size = int | tuple[int, int]


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise TypeError(
            f"augmentations expect normalised float (B, C, H, W) tensors; got {x.dtype} of shape "
            f"{tuple(x.shape)} (normalise int16 tiles first, e.g. loaders.device_normalize)"
        )


def _rand(n: int, generator: torch.Generator | None, *extra: int) -> torch.Tensor:
    """U[0, 1) of shape (n, *extra) on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand((n, *extra), generator=generator, device=device)


def _uniform(n: int, low: float, high: float, g: torch.Generator | None,
             device: torch.device) -> torch.Tensor:  # fmt: skip
    return to_device(low + (high - low) * _rand(n, g), device)


def _coin(n: int, p: float, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return to_device(_rand(n, g) < p, device)


def crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float], generator: torch.Generator | None = None,
               tries: int = 10) -> torch.Tensor:  # fmt: skip
    """Per-sample integer crop boxes (B, 4) = (x0, y0, x1, y1), torchvision's RandomResizedCrop
    rule vectorised: ``tries`` draws of area fraction and log-uniform aspect ratio, the first that
    fits wins, else a centre crop with the aspect ratio clamped into ``ratio``."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * _rand(batch, generator, tries))
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * _rand(batch, generator, tries))
    w = torch.round(torch.sqrt(target * aspect))  # (B, tries)
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # first fitting try (0 if none fits)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    in_ratio = width / height  # fallback: centre crop
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    offsets = _rand(batch, generator, 2)
    x0 = torch.where(any_fit, torch.floor(offsets[:, 0] * (width - w + 1)), (width - w) // 2)
    y0 = torch.where(any_fit, torch.floor(offsets[:, 1] * (height - h + 1)), (height - h) // 2)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def resample(x: torch.Tensor, boxes: torch.Tensor, size: Size) -> torch.Tensor:
    """Crop box ``b`` of sample ``b`` and resize it to ``size`` (bilinear; averages several
    samples per output pixel when shrinking, which avoids aliasing). (B, C, h, w)."""
    out = (size, size) if isinstance(size, int) else tuple(size)
    index = torch.arange(len(x), device=x.device, dtype=x.dtype)[:, None]
    rois = torch.cat([index, to_device(boxes, x.device).to(x.dtype)], dim=1)  # (B, 5)
    return roi_align(x, rois, out, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def random_resized_crop(x: torch.Tensor, size: Size, scale: tuple[float, float] = (0.32, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """A random box per sample (area fraction ``scale``, aspect ``ratio``) resized to ``size``."""
    _check(x)
    boxes = crop_boxes(len(x), x.shape[-2], x.shape[-1], scale, ratio, generator)
    return resample(x, boxes, size)


def random_flip(x: torch.Tensor, p: float = 0.5, rotate90: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Per sample: horizontal flip and vertical flip (each with probability ``p``), then, with
    ``rotate90``, a rotation by k * 90 degrees, k uniform in 0..3 (square tiles only)."""
    _check(x)
    b, c, h, w = x.shape
    # Move an index image, not the pixels: one gather then applies each sample's permutation.
    src = torch.arange(h * w, device=x.device).view(1, h, w).expand(b, h, w)  # (B, H, W)
    hflip = _coin(b, p, generator, x.device)[:, None, None]
    vflip = _coin(b, p, generator, x.device)[:, None, None]
    src = torch.where(hflip, src.flip(-1), src)
    src = torch.where(vflip, src.flip(-2), src)
    if rotate90:
        if h != w:
            raise ValueError(f"rotate90 needs square images, got {h}x{w}")
        k = to_device(torch.floor(_rand(b, generator) * 4), x.device)[:, None, None]
        for turns in (1, 2, 3):
            src = torch.where(k == turns, src.rot90(turns, (-2, -1)), src)
    index = src.reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)


def brightness_contrast(x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4,
                        p: float = 0.8, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """With probability ``p`` per sample: contrast ``c ~ U[1-contrast, 1+contrast]`` about the
    sample mean, then a shift ``U[-brightness, brightness]`` (units of band std; on normalised
    data 0 is the band mean, so a shift is the brightness analogue). One affine ``a*x + b`` for
    all bands and pixels of a sample, so spectral shape is preserved."""
    _check(x)
    n, device = len(x), x.device
    apply = _coin(n, p, generator, device)
    c = _uniform(n, max(0.0, 1 - contrast), 1 + contrast, generator, device)
    shift = _uniform(n, -brightness, brightness, generator, device)
    c = torch.where(apply, c, torch.ones_like(c)).to(x.dtype)[:, None, None, None]
    shift = torch.where(apply, shift, torch.zeros_like(shift)).to(x.dtype)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return torch.addcmul((1 - c) * mean + shift, x, c)  # c * (x - mean) + mean + shift


def solarize(x: torch.Tensor, threshold: float = 0.0, p: float = 0.2,
             generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """With probability ``p`` per sample, reflect values above ``threshold`` about it
    (``x -> 2*threshold - x``): the normalised-data version of inverting bright pixels."""
    _check(x)
    apply = _coin(len(x), p, generator, x.device)[:, None, None, None]
    mirror = torch.where(apply, 2 * threshold, math.inf).to(x.dtype)  # (B, 1, 1, 1)
    return torch.minimum(x, mirror - x)  # = 2t - x exactly where x > t, else x


def gaussian_blur(x: torch.Tensor, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5,
                  generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """With probability ``p`` per sample, a separable Gaussian blur with ``sigma ~ U[sigma]``,
    the same kernel for every band (reflect padding: no dark borders)."""
    _check(x)
    b, _, h, w = x.shape
    s = _uniform(b, sigma[0], sigma[1], generator, x.device).to(x.dtype)
    apply = _coin(b, p, generator, x.device)
    rows = _blur_matrix(s, apply, h, math.ceil(3 * sigma[1]))  # (B, H, H)
    cols = _blur_matrix(s, apply, w, math.ceil(3 * sigma[1]))  # (B, W, W)
    # Two batched matmuls beat a depthwise conv with B*C groups, on CPU and GPU alike.
    y = torch.matmul(rows[:, None], x)  # (B, C, H, W): blur along H
    return torch.matmul(y, cols.transpose(1, 2)[:, None])  # along W


def _blur_matrix(sigma: torch.Tensor, apply: torch.Tensor, n: int, radius: int) -> torch.Tensor:
    """(B, n, n) matrices applying a 1-D Gaussian per sample with reflect padding folded in
    (identity where ``apply`` is False). Rows sum to 1, so constants stay constant."""
    radius = min(radius, n - 1)
    offsets = torch.arange(-radius, radius + 1, device=sigma.device)  # (K,)
    kernel = torch.exp(-0.5 * (offsets.to(sigma.dtype)[None] / sigma[:, None]) ** 2)  # (B, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(sigma.dtype).expand_as(kernel)
    kernel = torch.where(apply[:, None], kernel, delta)
    src = torch.arange(n, device=sigma.device)[:, None] + offsets[None]  # (n, K)
    src = torch.where(src < 0, -src, torch.where(src > n - 1, 2 * (n - 1) - src, src))
    matrix = torch.zeros(len(sigma), n, n, device=sigma.device, dtype=sigma.dtype)
    index = src[None].expand(len(sigma), n, len(offsets))
    return matrix.scatter_add_(2, index, kernel[:, None, :].expand_as(index))


@dataclass
class MultiCrop:
    """DINO multi-crop: 2 global and ``n_local`` local views of a normalised batch.

    Each view: random resized crop, flips (+ 90-degree rotations), brightness/contrast; then the
    asymmetric DINO recipe: global 1 always blurred, global 2 rarely blurred but sometimes
    solarized, locals blurred half the time.
    """

    global_size: int = 64
    local_size: int = 32
    n_local: int = 4
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    rotate90: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    jitter_p: float = 0.8

    def view(self, x: torch.Tensor, size: int, scale: tuple[float, float], blur_p: float,
             solarize_p: float, generator: torch.Generator | None) -> torch.Tensor:  # fmt: skip
        """One augmented view (B, C, size, size)."""
        v = random_resized_crop(x, size, scale, generator=generator)
        v = random_flip(v, rotate90=self.rotate90, generator=generator)
        v = brightness_contrast(v, self.brightness, self.contrast, self.jitter_p, generator)
        v = gaussian_blur(v, p=blur_p, generator=generator)
        return solarize(v, p=solarize_p, generator=generator) if solarize_p > 0 else v

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        """(globals: 2 x (B, C, G, G), locals: n_local x (B, C, L, L))."""
        g, gs = self.global_size, self.global_scale
        globals_ = [
            self.view(x, g, gs, blur_p=1.0, solarize_p=0.0, generator=generator),
            self.view(x, g, gs, blur_p=0.1, solarize_p=0.2, generator=generator),
        ]
        locals_ = [
            self.view(x, self.local_size, self.local_scale, 0.5, 0.0, generator)
            for _ in range(self.n_local)
        ]
        return globals_, locals_


@dataclass
class MAEAugment:
    """MAE's light augmentation: random resized crop to ``size`` + flips (+ 90-degree rotations)."""

    size: int = 64
    scale: tuple[float, float] = (0.2, 1.0)
    rotate90: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, size, size)."""
        x = random_resized_crop(x, self.size, self.scale, generator=generator)
        return random_flip(x, rotate90=self.rotate90, generator=generator)
