"""GeoTIFF scene I/O in the WHU-OHS format (rasterio): (C, H, W) int16 images, (H, W) uint8 labels."""

from __future__ import annotations

import os
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from affine import Affine

# A plausible default georeference for generated scenes: UTM 50N, 10 m pixels (OHS GSD).
DEFAULT_CRS = "EPSG:32650"


@cache
def _rasterio() -> ModuleType:
    """rasterio, imported on first GeoTIFF use: the shard-based stages (training, benchmarks)
    run on machines without it."""
    try:
        import rasterio
        import rasterio.transform
        from rasterio.errors import NotGeoreferencedWarning
    except ImportError as exc:
        raise ImportError(
            f"GeoTIFF scene I/O (hsissl.data.geotiff) needs the 'rasterio' package, which failed "
            f"to import ({exc}); install it with `pip install rasterio`"
        ) from exc
    # Georeference is optional in the data contract (the real .mat scenes have none).
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    return rasterio


def default_transform(index: int = 0, size: int = 512, gsd: float = 10.0) -> Affine:
    """Non-overlapping placement of generated scene ``index`` on a 10 m grid."""
    return _rasterio().transform.Affine(
        gsd, 0.0, 500000.0 + index * size * gsd, 0.0, -gsd, 3400000.0
    )


def write_image(
    path: str | Path,
    image: np.ndarray,
    transform: Affine | None = None,
    crs: str | None = DEFAULT_CRS,
) -> Path:
    """Write a (C, H, W) array as an uncompressed band-interleaved GeoTIFF, atomically."""
    if image.ndim != 3:
        raise ValueError(f"{path}: expected a (C, H, W) image, got shape {image.shape}")
    return _write(path, image, transform, crs)


def write_label(
    path: str | Path,
    label: np.ndarray,
    transform: Affine | None = None,
    crs: str | None = DEFAULT_CRS,
) -> Path:
    """Write a (H, W) uint8 label map as a single-band GeoTIFF, atomically."""
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"{path}: expected a (H, W) uint8 label, got {label.dtype} {label.shape}")
    return _write(path, label[None], transform, crs)


def _write(path: str | Path, data: np.ndarray, transform: Affine | None, crs: str | None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    profile = {
        "driver": "GTiff",
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "dtype": data.dtype.name,
        "interleave": "band",
    }
    if transform is not None:
        profile["transform"] = transform
        profile["crs"] = crs
    with _rasterio().open(tmp, "w", **profile) as dst:
        dst.write(data)
    os.replace(tmp, path)
    return path


def read_image(path: str | Path) -> np.ndarray:
    """(C, H, W) array in the file's dtype."""
    with _rasterio().open(path) as src:
        return src.read()


def read_label(path: str | Path) -> np.ndarray:
    """(H, W) array in the file's dtype."""
    with _rasterio().open(path) as src:
        return src.read(1)
