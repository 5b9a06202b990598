"""The generated default dataset: WHU-OHS-layout GeoTIFF scenes that are learnable, not trivial.

A scene is a warped Voronoi partition into land-cover regions (parcels), grouped into a few
landscape zones (farmland, forest, urban, arid, wetland) that decide which classes occur
together and how small the parcels are. Each region takes one class spectrum (24 smooth
signatures over the OHS bands, built from vegetation/soil/water/urban endmembers, some pairs
deliberately close) and gets the variation a real 10 m sensor would show: per-region
brightness and spectral tilt, sub-pixel mixing with a second cover, class-specific fine
texture, a point-spread blur at boundaries, per-scene illumination and per-pixel noise.
A per-pixel spectral classifier therefore does well but not perfectly; spatial context helps.

The class signatures are fixed (a property of this synthetic world); ``cfg.seed`` only decides
the scenes, so datasets made with different seeds share one class-to-spectrum mapping.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from hsissl.config import SyntheticConfig
from hsissl.data.geotiff import default_transform, write_image, write_label
from hsissl.data.ohs import BAND_CENTRES_NM, NUM_CLASSES, REFLECTANCE_SCALE

WAVELENGTHS_NM = np.asarray(BAND_CENTRES_NM, dtype=np.float64)  # (32,)
_SIGNATURE_SEED = 24_032  # fixed on purpose: spectra must not change with cfg.seed
_MEAN_REGION_AREA_PX = 1200  # ~35 px (350 m) parcels on average; zones make them ~10-150 px
_RIVER = 10  # "River canal": drawn as meandering bands, not as Voronoi parcels
_MIN_REPAINT_PX = 20  # a region repainted to place a missing class must be visible

# Landscape zones: (share of zones, parcel density relative to the mean, class weights).
# The weights make the dataset imbalanced like WHU-OHS (farmland, woodland and built-up
# dominate; beach, shoal, rock, saline soil, marsh and ocean are rare).
LANDSCAPES: dict[str, tuple[float, float, dict[int, float]]] = {
    "farmland": (0.35, 1.2, {1: 30, 2: 40, 16: 10, 7: 6, 8: 6, 3: 5, 12: 4, 4: 2}),
    "forest": (0.25, 0.5, {3: 40, 4: 15, 5: 12, 6: 6, 7: 10, 8: 6, 23: 2, 12: 2}),
    "urban": (0.15, 3.0, {15: 45, 17: 20, 16: 12, 2: 8, 9: 6, 11: 4}),
    "arid": (0.15, 0.6, {22: 25, 18: 15, 19: 12, 9: 20, 20: 5, 23: 5, 8: 6}),
    "wetland": (0.10, 0.8, {11: 25, 21: 10, 1: 15, 24: 8, 13: 6, 14: 5, 12: 12, 8: 5}),
}

# Within-region roughness per class: crowns, roofs, furrows and rocks are rough, water is
# smooth. It scales a fine (~3 px) brightness texture and sub-pixel mixing; a single pixel
# cannot see it, a neighbourhood can.
ROUGHNESS: dict[int, float] = {
    1: 0.04, 2: 0.08, 3: 0.15, 4: 0.15, 5: 0.25, 6: 0.12, 7: 0.06, 8: 0.10, 9: 0.14,
    10: 0.02, 11: 0.02, 12: 0.03, 13: 0.08, 14: 0.12, 15: 0.30, 16: 0.25, 17: 0.20,
    18: 0.05, 19: 0.10, 20: 0.06, 21: 0.15, 22: 0.08, 23: 0.18, 24: 0.01,
}  # fmt: skip
MIX_BASE, MIX_ROUGHNESS = 0.12, 2.0  # std of fine sub-pixel mixing = base + this x roughness


# --- class spectra -------------------------------------------------------------------------


def _bump(centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((WAVELENGTHS_NM - centre) / width) ** 2)


def _step(centre: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(WAVELENGTHS_NM - centre) / width))


def _vegetation(vis: float, green: float, nir: float, edge: float = 720.0) -> np.ndarray:
    """Green peak, red absorption, red edge and NIR plateau (reflectance 0..1)."""
    leaf = vis + green * _bump(552, 28) - 0.6 * vis * _bump(672, 22)
    leaf += (nir - vis) * _step(edge, 13)
    return leaf * (1 - 0.05 * _bump(945, 25))  # leaf water absorption begins near 940 nm


def _soil(lo: float, hi: float, bend: float = 0.7) -> np.ndarray:
    """Monotone, concave rise towards the NIR (bare soil, sand, gravel)."""
    t = (WAVELENGTHS_NM - WAVELENGTHS_NM[0]) / (WAVELENGTHS_NM[-1] - WAVELENGTHS_NM[0])
    return lo + (hi - lo) * t**bend


def _water(blue: float, turbid: float = 0.0, algae: float = 0.0) -> np.ndarray:
    """Low and decreasing; sediment lifts 550-700 nm, algae add green and red-edge bumps."""
    base = blue * np.exp(-(WAVELENGTHS_NM - 466) / 120) + 0.004
    return base + turbid * _bump(600, 60) + algae * (_bump(560, 20) + 0.5 * _bump(705, 12))


def _flat(level: float, slope: float = 0.0) -> np.ndarray:
    return level * (1 + slope * (WAVELENGTHS_NM - 700) / 474)


@functools.cache
def class_signatures() -> np.ndarray:
    """(24, 32) reflectance 0..1; row ``k`` is class ``k + 1`` (WHU-OHS ids 1..24)."""
    veg, grass = _vegetation(0.04, 0.04, 0.40), _vegetation(0.05, 0.05, 0.42, edge=716)
    wood = _vegetation(0.03, 0.03, 0.36, edge=724)
    soil, sand, water = _soil(0.12, 0.30), _soil(0.22, 0.42, bend=0.6), _water(0.05)
    base = {
        1: 0.7 * _vegetation(0.04, 0.05, 0.34, edge=718) + 0.3 * water,  # Paddy field
        2: 0.55 * _vegetation(0.05, 0.04, 0.38) + 0.45 * soil,  # Dry farm
        3: wood,  # Woodland
        4: 0.8 * veg + 0.2 * soil,  # Shrubbery
        5: 0.6 * wood + 0.4 * _soil(0.08, 0.18),  # Sparse woodland
        6: _vegetation(0.035, 0.035, 0.41, edge=722),  # Other forest land
        7: 0.8 * grass + 0.2 * soil,  # High-covered grassland (7-9 differ modestly)
        8: 0.6 * grass + 0.4 * soil,  # Medium-covered grassland
        9: 0.4 * grass + 0.6 * soil,  # Low-covered grassland
        10: _water(0.04, turbid=0.05),  # River canal
        11: _water(0.05, turbid=0.012),  # Lake
        12: _water(0.045, turbid=0.015, algae=0.02),  # Reservoir pond
        13: 0.6 * sand + 0.4 * water,  # Beach land
        14: 0.35 * sand + 0.65 * _water(0.05, turbid=0.04),  # Shoal
        15: _flat(0.17, 0.10),  # Urban built-up
        16: 0.6 * _flat(0.15, 0.05) + 0.4 * veg,  # Rural settlement
        17: 0.6 * _flat(0.26, 0.05) + 0.4 * soil,  # Other construction land
        18: sand,  # Sand
        19: _soil(0.15, 0.27, bend=0.9),  # Gobi
        20: _flat(0.38, -0.08),  # Saline-alkali soil
        21: 0.45 * veg + 0.55 * _water(0.05, turbid=0.02),  # Marshland
        22: _soil(0.13, 0.31, bend=0.55),  # Bare land
        23: _flat(0.22, -0.06) * (1 - 0.08 * _bump(900, 40)),  # Bare rock
        24: _water(0.06),  # Ocean
    }
    rng = np.random.default_rng(_SIGNATURE_SEED)
    t = (WAVELENGTHS_NM - WAVELENGTHS_NM[0]) / (WAVELENGTHS_NM[-1] - WAVELENGTHS_NM[0])
    k = np.arange(1, 4)[:, None]  # (3, 1)
    rows = []
    for cls in range(1, NUM_CLASSES + 1):
        # A smooth few-% wiggle per class (three cosines), so no two spectra are affine copies.
        amp, phase = rng.normal(0, 0.025, (3, 1)), rng.uniform(0, 2 * np.pi, (3, 1))
        rows.append(base[cls] * (1 + (amp * np.cos(np.pi * k * t + phase)).sum(0)))
    return np.clip(np.stack(rows), 0.002, 1.0)


# --- spatial fields and layout ---------------------------------------------------------------


def _bspline_matrix(size: int, scale: float, n: int) -> np.ndarray:
    """(size, n) cubic B-spline weights: pixel i from coefficients spaced ``scale`` px apart."""
    t = np.abs(np.arange(size)[:, None] / scale + 1.0 - np.arange(n)[None, :])
    return np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """(size, size) float32 zero-mean, unit-std noise with features ~``scale`` px across.

    Separable B-spline interpolation of white noise as two small matrix products: smooth,
    and far cheaper than resampling or filtering a full-size grid.
    """
    n = int(size / scale) + 4
    basis = _bspline_matrix(size, scale, n)  # (size, n)
    field = basis @ rng.standard_normal((n, n)) @ basis.T  # (size, size)
    field -= field.mean()
    return (field / (field.std() + 1e-12)).astype(np.float32)


def _warped_voronoi(rng: np.random.Generator, points: np.ndarray, size: int, warp_px: float,
                    warp_scale: float) -> np.ndarray:  # fmt: skip
    """(size, size) index of the nearest point, measured at noise-displaced pixel positions."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy += warp_px * smooth_field(rng, size, warp_scale)
    xx += warp_px * smooth_field(rng, size, warp_scale)
    _, index = cKDTree(points).query(np.stack([yy.ravel(), xx.ravel()], axis=1), workers=-1)
    return index.reshape(size, size)


def _sample_points(rng: np.random.Generator, density: np.ndarray, count: int) -> np.ndarray:
    """(count, 2) points (y, x) drawn with probability proportional to ``density`` (H, W)."""
    width = density.shape[1]
    flat = rng.choice(density.size, size=count, p=(density / density.sum()).ravel())
    jitter = rng.random((count, 2))  # sub-pixel positions, so points never coincide
    return np.stack([flat // width, flat % width], axis=1) + jitter


def _rivers(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) bool: meandering river bands 3-9 px wide (0.6 per 512 px scene on average)."""
    mask = np.zeros((size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(rng.poisson(0.6 * size / 512)):
        angle = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0, size, 2)
        across = (yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)  # signed distance
        across += 0.04 * size * smooth_field(rng, size, size / 4)  # meanders
        mask |= np.abs(across) < rng.uniform(1.5, 4.5)
    return mask


def _layout(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Region map (H, W), class per region (R,), landscape name per region."""
    names = list(LANDSCAPES)
    shares = np.array([LANDSCAPES[n][0] for n in names])

    # Zones: a warped Voronoi on an 8x coarser grid (zones only steer the draws below).
    coarse = -(-size // 8)
    n_zones = max(2, round(size * size / 200**2))
    zone_pts = rng.uniform(0, coarse, (n_zones, 2))
    zone_of_pt = rng.choice(len(names), size=n_zones, p=shares / shares.sum())
    zones = zone_of_pt[_warped_voronoi(rng, zone_pts, coarse, 0.08 * coarse, coarse / 3)]
    zone_map = np.repeat(np.repeat(zones, 8, axis=0), 8, axis=1)[:size, :size]  # (H, W)

    # Parcels: dense in urban zones, sparse in forests; warped so boundaries are not straight.
    density = np.array([LANDSCAPES[n][1] for n in names])[zone_map]  # (H, W)
    density *= np.exp(0.5 * smooth_field(rng, size, 96))
    n_regions = max(4, round(size * size / _MEAN_REGION_AREA_PX))
    points = _sample_points(rng, density, n_regions)  # (R, 2)
    region = _warped_voronoi(rng, points, size, 5.0, 20.0)  # (H, W)

    # One class per parcel, drawn from its zone's weights.
    region_zone = zone_map[points[:, 0].astype(int), points[:, 1].astype(int)]  # (R,)
    landscapes = [names[z] for z in region_zone]
    classes = np.array([_draw_class(rng, name) for name in landscapes], dtype=np.int64)

    river = _rivers(rng, size)
    if river.any():  # all rivers together become one extra region painted over the parcels
        region[river] = n_regions
        classes = np.append(classes, _RIVER)
        landscapes.append("wetland")
    return region, classes, landscapes


def _draw_class(rng: np.random.Generator, landscape: str) -> int:
    weights = LANDSCAPES[landscape][2]
    w = np.array(list(weights.values()), dtype=float)
    return int(rng.choice(list(weights), p=w / w.sum()))


def _ensure_classes(rng: np.random.Generator, classes: np.ndarray, unlabelled: np.ndarray,
                    pixels: np.ndarray, ensure: Iterable[int]) -> None:  # fmt: skip
    """Repaint regions in place so each class in ``ensure`` has a labelled region (best effort)."""
    repainted = np.zeros(classes.size, dtype=bool)
    for cls in ensure:
        if ((classes == cls) & ~unlabelled & (pixels > 0)).any():
            continue
        usable = ~unlabelled & (pixels >= _MIN_REPAINT_PX) & ~repainted
        counts = np.bincount(classes[usable], minlength=NUM_CLASSES + 1)
        donors = np.flatnonzero(usable & (counts[classes] > 1))  # donor classes stay present
        if donors.size:
            pick = rng.choice(donors)
            classes[pick], repainted[pick] = cls, True


# --- rendering -------------------------------------------------------------------------------


def _render(rng: np.random.Generator, region: np.ndarray, classes: np.ndarray,
            landscapes: list[str], noise: float) -> np.ndarray:  # fmt: skip
    """(32, H, W) int16 reflectance x 10000 for a region map (H, W) and classes (R,)."""
    size, n = region.shape[0], classes.size
    sig = class_signatures()  # (24, 32)
    bands = (WAVELENGTHS_NM - 700) / 474  # (32,) -0.5..0.5: for gentle spectral tilts

    # Per region: class spectrum x brightness x tilt, and a second cover of the same zone.
    tilt = 1 + rng.normal(0, 0.03, (n, 1)) * bands  # (R, 32)
    primary = sig[classes - 1] * rng.uniform(0.85, 1.15, (n, 1)) * tilt  # (R, 32)
    others = np.array([_draw_class(rng, name) for name in landscapes])
    secondary = sig[others - 1] * rng.uniform(0.85, 1.15, (n, 1))  # (R, 32)
    mean_mix = rng.uniform(0.0, 0.25, n)  # (R,)
    # Scene illumination (level, slight tilt) and the x10000 storage scale are per-band
    # factors: folded into the region spectra before they are expanded to pixels.
    gain = REFLECTANCE_SCALE * rng.uniform(0.92, 1.08) * (1 + rng.normal(0, 0.02) * bands)
    p32 = (primary * gain).T.astype(np.float32)  # (32, R)
    d32 = ((secondary - primary) * gain).T.astype(np.float32)  # (32, R)

    # Per pixel: sub-pixel mixing (region share + fine patches) and texture, both rougher
    # for rough classes, so rough covers scatter pixel by pixel around the region's mean.
    roughness = np.array([0.0] + [ROUGHNESS[c] for c in range(1, NUM_CLASSES + 1)])
    rough = roughness[classes][region].astype(np.float32)  # (H, W)
    mix = mean_mix[region].astype(np.float32)  # (H, W)
    mix += (MIX_BASE + MIX_ROUGHNESS * rough) * smooth_field(rng, size, 2.5)
    np.clip(mix, 0, 0.95, out=mix)
    texture = 1 + 0.05 * smooth_field(rng, size, 8)  # (H, W) gentle, all classes
    texture += rough * smooth_field(rng, size, 2.5)
    np.clip(texture, 0.3, None, out=texture)
    image = d32[:, region]  # (32, H, W)
    image *= mix
    image += p32[:, region]  # = (1 - mix) * primary + mix * secondary
    image *= texture

    # Sensor: point-spread blur (mixed boundary pixels), then noise proportional to signal.
    _psf_blur_edges(image, region)
    gain_noise = rng.standard_normal(image.shape, dtype=np.float32)  # (32, H, W)
    gain_noise *= np.float32(noise)
    gain_noise += 1
    image *= gain_noise
    np.rint(image, out=image)
    np.clip(image, 0, REFLECTANCE_SCALE, out=image)
    return image.astype(np.int16)


def _psf_blur_edges(image: np.ndarray, region: np.ndarray) -> None:
    """In place: the sensor PSF, a 3x3 binomial blur (sigma ~0.7 px), on (C, H, W) ``image``.

    Only pixels next to a region boundary are blurred: inside a region the image is already
    smooth at that scale, and a full 32-band blur would cost more than the rest of a scene.
    """
    h, w = region.shape
    edge = ndimage.maximum_filter(region, 3) != ndimage.minimum_filter(region, 3)  # (H, W)
    ys, xs = np.nonzero(edge)
    flat = image.reshape(image.shape[0], -1)  # (C, H*W) view
    blurred = np.zeros((image.shape[0], ys.size), dtype=image.dtype)  # (C, E)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            weight = np.float32((2 - abs(dy)) * (2 - abs(dx)) / 16)
            neighbour = np.clip(ys + dy, 0, h - 1) * w + np.clip(xs + dx, 0, w - 1)
            blurred += weight * flat[:, neighbour]
    flat[:, ys * w + xs] = blurred


def generate_scene(rng: np.random.Generator, size: int = 512, *, noise: float = 0.04,
                   unlabelled_fraction: float = 0.15,
                   ensure: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One scene: ((32, size, size) int16 reflectance x 10000 in 0..10000, (size, size) uint8).

    ``noise``: per-pixel noise std as a fraction of reflectance. ``unlabelled_fraction``: share
    of regions labelled 0 (their pixels keep their class's spectrum). ``ensure``: classes to
    place in a labelled region if the draw missed them (best effort: only regions whose class
    stays present elsewhere in the scene are repainted).
    """
    region, classes, landscapes = _layout(rng, size)  # (H, W), (R,), R names
    unlabelled = rng.random(classes.size) < unlabelled_fraction  # (R,)
    pixels = np.bincount(region.ravel(), minlength=classes.size)  # (R,)
    _ensure_classes(rng, classes, unlabelled, pixels, ensure)
    image = _render(rng, region, classes, landscapes, noise)  # (32, H, W)
    label = np.where(unlabelled, 0, classes).astype(np.uint8)[region]  # (H, W)
    return image, label


# --- dataset -------------------------------------------------------------------------------


def scene_plan(cfg: SyntheticConfig) -> list[tuple[str, str, int]]:
    """(split, name, 1-based scene index) per scene, in ``cfg.scenes`` order; names S0001, ..."""
    plan, index = [], 0
    for split, count in cfg.scenes.items():
        for _ in range(count):
            index += 1
            plan.append((split, f"S{index:04d}", index))
    return plan


def make_synthetic(out: str | Path, cfg: SyntheticConfig) -> Path:
    """Write ``<out>/<split>/{image,label}/<name>.tif`` for ``cfg.scenes``; returns ``out``.

    Deterministic: the same cfg gives byte-identical files (scene ``i`` uses the seed
    ``[cfg.seed, i]``). Every class gets a labelled region in the training split ("tr",
    else the first split) where its scenes have room for one.
    """
    out = Path(out)
    plan = scene_plan(cfg)
    _check_no_stale_scenes(out, plan)
    train = "tr" if "tr" in cfg.scenes else next(iter(cfg.scenes))
    train_seen = 0
    for split, name, index in plan:
        ensure: list[int] = []
        if split == train:  # deal the 24 classes round-robin over the training scenes
            n_train = cfg.scenes[train]
            ensure = [c for c in range(1, NUM_CLASSES + 1) if (c - 1) % n_train == train_seen]
            train_seen += 1
        rng = np.random.default_rng([cfg.seed, index])
        image, label = generate_scene(rng, cfg.size, noise=cfg.noise,
                                      unlabelled_fraction=cfg.unlabelled_fraction, ensure=ensure)  # fmt: skip
        transform = default_transform(index - 1, cfg.size)
        write_image(out / split / "image" / f"{name}.tif", image, transform)
        write_label(out / split / "label" / f"{name}.tif", label, transform)
    return out


def _check_no_stale_scenes(out: Path, plan: list[tuple[str, str, int]]) -> None:
    """Refuse to mix this dataset with scenes another config left in the same folder."""
    wanted = {(split, name) for split, name, _ in plan}
    for split in dict.fromkeys(split for split, _, _ in plan):
        for kind in ("image", "label"):
            for path in sorted((out / split / kind).glob("*.tif")):
                if (split, path.stem) not in wanted:
                    raise FileExistsError(
                        f"{path}: not a scene of this synthetic config ({len(plan)} scenes); "
                        "expected an empty folder or one written with the same synthetic.scenes"
                    )
