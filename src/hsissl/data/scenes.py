"""WHU-OHS scene discovery, the data contract, and the checked scene reader.

Layout: ``<root>/<split>/image/*.tif`` paired by file name with ``<root>/<split>/label/*.tif``.
Header checks (cheap, metadata only) run on every file before anything is written;
content checks (label range, NaN, nodata) run on the pixels as they are read, so a
whole dataset is read once. Every violation names the file, what was found and what
was expected.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from hsissl.data.ohs import NUM_BANDS, NUM_CLASSES

IMAGE_DTYPES = ("int16", "uint16", "float32", "float64")  # stored as int16 reflectance x 10000
INT16_MAX = np.iinfo(np.int16).max
INT16_MIN = np.iinfo(np.int16).min

# Georeference is optional in the data contract (the real .mat scenes have none).
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


@dataclass(frozen=True)
class Violation:
    file: str
    field: str
    found: str
    expected: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: found {self.found}, expected {self.expected}"


class DataContractError(ValueError):
    """Input scenes break the data contract; nothing has been written."""

    def __init__(self, violations: list[Violation]):
        self.violations = list(violations)
        head = "\n  ".join(str(v) for v in self.violations[:20])
        more = len(self.violations) - 20
        tail = f"\n  … and {more} more (run with --report to list all)" if more > 0 else ""
        super().__init__(f"{len(self.violations)} data contract violation(s):\n  {head}{tail}")


@dataclass(frozen=True)
class ScenePair:
    split: str
    name: str  # file stem, unique within the dataset
    image: Path  # or an object in S3 (hsissl.data.s3_scenes.ObjectFile), read in place
    label: Path


@dataclass(frozen=True)
class SceneHeader:
    pair: ScenePair
    height: int
    width: int
    dtype: str
    nodata: float | None


def discover(root: Path, splits: list[str]) -> tuple[dict[str, list[ScenePair]], list[Violation]]:
    """Pair images with labels by file name in each split folder."""
    if not root.is_dir():
        return {}, [
            Violation(str(root), "dataset root", "no such folder", "a WHU-OHS-layout folder")
        ]
    listing = {}
    for split in splits:
        img_dir, lbl_dir = root / split / "image", root / split / "label"
        images = {p.stem: p for p in sorted(img_dir.glob("*.tif"))} if img_dir.is_dir() else {}
        labels = {p.stem: p for p in sorted(lbl_dir.glob("*.tif"))} if lbl_dir.is_dir() else {}
        listing[split] = (images, labels)
    return pair_scenes(root, splits, listing)


def pair_scenes(root, splits: list[str], listing: dict[str, tuple[dict, dict]]
                ) -> tuple[dict[str, list[ScenePair]], list[Violation]]:  # fmt: skip
    """Pairs and pairing violations from each split's ``(images, labels)`` (stem -> file); the
    same for a folder and an S3 prefix (``root``: a Path or ``hsissl.data.s3_scenes.ObjectRoot``)."""
    pairs: dict[str, list[ScenePair]] = {}
    violations: list[Violation] = []
    for split in splits:
        img_dir, lbl_dir = root / split / "image", root / split / "label"
        images, labels = listing[split]
        for name in sorted(images.keys() - labels.keys()):
            violations.append(Violation(str(images[name]), "label file", "none",
                                        f"{lbl_dir / (name + '.tif')}"))  # fmt: skip
        for name in sorted(labels.keys() - images.keys()):
            violations.append(Violation(str(labels[name]), "image file", "none",
                                        f"{img_dir / (name + '.tif')}"))  # fmt: skip
        found = [
            ScenePair(split, n, images[n], labels[n]) for n in sorted(images.keys() & labels.keys())
        ]
        if not found and not (images or labels):
            violations.append(Violation(str(root / split), "split", "no scenes",
                                        "image/*.tif with matching label/*.tif"))  # fmt: skip
        pairs[split] = found
    # A name in two splits is split leakage: data/leakage.py reports it (refused unless allowed).
    return pairs, violations


def file_size(file) -> int:
    """Bytes of a scene file: a Path, or an object in S3 (which knows its size)."""
    size = getattr(file, "size", None)
    return size if isinstance(size, int) else file.stat().st_size


def file_identity(split: str, file) -> str:
    """A scene file's version in the dataset fingerprint: size and mtime of a local file, size
    and ETag of an S3 object."""
    version = getattr(file, "etag", None)
    if version is None:
        st = file.stat()
        size, version = st.st_size, st.st_mtime_ns
    else:
        size = file.size
    return f"{split}/{file.parent.name}/{file.name}:{size}:{version}\n"


def check_header(
    pair: ScenePair, scene_size: int | None, min_size: int
) -> tuple[SceneHeader | None, list[Violation]]:
    """Metadata checks of one image/label pair (no pixels read)."""
    out: list[Violation] = []
    try:
        with rasterio.open(pair.image) as img, rasterio.open(pair.label) as lbl:
            if img.count != NUM_BANDS:
                out.append(Violation(str(pair.image), "band count", str(img.count), str(NUM_BANDS)))
            dtype = img.dtypes[0]
            if dtype not in IMAGE_DTYPES:
                out.append(Violation(str(pair.image), "dtype", dtype,
                                     "int16 reflectance x 10000 (uint16, float32/64 accepted)"))  # fmt: skip
            shape = (img.height, img.width)
            if scene_size is not None and shape != (scene_size, scene_size):
                out.append(Violation(str(pair.image), "size", f"{shape[0]}x{shape[1]}",
                                     f"{scene_size}x{scene_size}"))  # fmt: skip
            elif min(shape) < min_size:
                out.append(Violation(str(pair.image), "size", f"{shape[0]}x{shape[1]}",
                                     f"at least {min_size}x{min_size} (one tile)"))  # fmt: skip
            if lbl.count != 1:
                out.append(Violation(str(pair.label), "band count", str(lbl.count), "1"))
            if lbl.dtypes[0] != "uint8":
                out.append(Violation(str(pair.label), "dtype", lbl.dtypes[0], "uint8"))
            if (lbl.height, lbl.width) != shape:
                out.append(Violation(str(pair.label), "size", f"{lbl.height}x{lbl.width}",
                                     f"{shape[0]}x{shape[1]} (same as its image)"))  # fmt: skip
            if img.crs and lbl.crs and (img.crs != lbl.crs or img.transform != lbl.transform):
                out.append(Violation(str(pair.label), "georeference", f"{lbl.crs} {tuple(lbl.transform)[:6]}",
                                     f"{img.crs} {tuple(img.transform)[:6]} (as its image)"))  # fmt: skip
            header = SceneHeader(pair, img.height, img.width, dtype, img.nodata)
    except RasterioError as exc:
        return None, [
            Violation(
                _which(pair, exc), "file", f"unreadable ({_reason(exc)})", "a readable GeoTIFF"
            )
        ]
    return (header if not out else None), out


def read_scene(header: SceneHeader) -> tuple[np.ndarray | None, np.ndarray | None, list[Violation]]:
    """Read pixels and check content; returns ((C, H, W) int16, (H, W) uint8, violations)."""
    pair = header.pair
    try:
        with rasterio.open(pair.image) as src:
            raw = src.read()  # (C, H, W)
        with rasterio.open(pair.label) as src:
            label = src.read(1)  # (H, W)
    except RasterioError as exc:
        return (
            None,
            None,
            [
                Violation(
                    _which(pair, exc), "file", f"unreadable ({_reason(exc)})", "a readable GeoTIFF"
                )
            ],
        )
    out = check_label(pair.label, label)
    image, image_violations = to_int16(pair.image, raw, header.nodata)
    out += image_violations
    return (image, label, out) if not out else (None, None, out)


def check_label(path: Path, label: np.ndarray) -> list[Violation]:
    top = int(label.max())
    if top <= NUM_CLASSES:
        return []
    bad = int((label > NUM_CLASSES).sum())
    return [Violation(str(path), "label values", f"max {top} ({bad} pixels > {NUM_CLASSES})",
                      f"0 (unlabelled) to {NUM_CLASSES}")]  # fmt: skip


def to_int16(
    path: Path, raw: np.ndarray, nodata: float | None
) -> tuple[np.ndarray, list[Violation]]:
    """The stored form: int16 reflectance x 10000, after NaN/nodata/range checks."""
    out: list[Violation] = []
    if raw.dtype.kind == "f":
        nan = int(np.isnan(raw).sum())
        if nan:
            out.append(
                Violation(str(path), "NaN pixels", f"{nan} NaN values", "finite reflectance values")
            )
            return raw, out
    if nodata is not None and not np.isnan(nodata):
        hits = int((raw == nodata).sum())
        if hits:
            out.append(Violation(str(path), "nodata", f"{hits} values equal nodata ({nodata:g})",
                                 "no nodata pixels in a scene"))  # fmt: skip
    if raw.dtype == np.int16:
        return raw, out
    lo, hi = raw.min(), raw.max()
    if lo < INT16_MIN or hi > INT16_MAX:
        out.append(Violation(str(path), "value range", f"{lo:g}..{hi:g}",
                             f"{INT16_MIN}..{INT16_MAX} (reflectance x 10000 as int16)"))  # fmt: skip
        return raw, out
    if raw.dtype.kind == "f":
        raw = np.rint(raw)
    return raw.astype(np.int16), out


def _reason(exc: Exception) -> str:
    """rasterio's text, or GDAL's own error it chains ("Read failed. See previous exception":
    the cause names the band and block, e.g. ``band 16: IReadBlock failed at X offset 0``)."""
    cause = exc.__cause__
    if cause is not None and "previous exception" in str(exc):
        return f"{exc} {cause}".replace(" See previous exception for details.", "")
    return str(exc)


def _which(pair: ScenePair, exc: Exception) -> str:
    # GDAL names the path it opened (/vsis3/… for an object in S3), maybe only in the cause
    text = f"{exc} {exc.__cause__ or ''}"
    label = (str(pair.label), os.fspath(pair.label))
    return str(pair.label) if any(name in text for name in label) else str(pair.image)
