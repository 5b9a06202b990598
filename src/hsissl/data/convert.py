"""Any hyperspectral cube -> the WHU-OHS layout ingest reads (``hsissl convert``).

``<dst>/<split>/image/<name>.tif`` (32, H, W) int16 reflectance x 10000, resampled to the OHS
bands; ``<dst>/<split>/label/<name>.tif`` (H, W) uint8; ``<dst>/<split>/meta/<name>.json``: what
was read and what was assumed (wavelength source, widths, resampling, scale, nodata, labels,
georeference). Georeference is kept when the source has one. A failed conversion leaves
nothing behind: scenes are written to a staging folder and moved into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hsissl.data import resample, sources
from hsissl.data.geotiff import write_image, write_label
from hsissl.data.label_rules import RULES
from hsissl.data.ohs import BAND_CENTRES_NM, NUM_BANDS, NUM_CLASSES, SPLITS
from hsissl.data.resample import ConvertError
from hsissl.data.sidecar import DEFAULT_MAX_EXTRAPOLATED, SceneSpec
from hsissl.data.sidecar import load as load_sidecar

INT16_MIN, INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max
SIDECAR_SUFFIXES = (".yaml", ".yml")
META = "meta"  # <dst>/<split>/meta/<name>.json: the per-scene record


@dataclass
class Converted:
    name: str
    image: np.ndarray  # (32, H, W) int16
    label: np.ndarray  # (H, W) uint8
    transform: Any  # affine.Affine or None
    crs: Any
    record: dict[str, Any]  # the per-scene JSON


@dataclass(frozen=True)
class Options:
    """Settings that override a sidecar (``None``: the sidecar's, else the default)."""

    resampling: str | None = None
    max_extrapolated: int | None = None
    label: Path | None = None  # a label raster / .npy for a single source


def read_source(path: Path, spec: SceneSpec) -> sources.SourceCube:
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: source file: not found" + (
            f" (named by {spec.where})" if spec.where != str(path) else ""))  # fmt: skip
    if path.suffix.lower() in sources.ARRAY_SUFFIXES:
        return sources.read_array(path, spec)
    return sources.read_raster(path)


def _wavelengths(src: sources.SourceCube, spec: SceneSpec, n_bands: int):
    """(centres nm, widths nm or None, record) from the sidecar, else from the file."""
    where = str(src.path)
    if spec.wavelengths_nm is not None:
        wl, origin = spec.wavelengths_nm, f"sidecar {spec.where}: {spec.grid_text}"
        file_fwhm, per_nm = None, spec.units_nm or 1.0
    elif src.wavelengths is not None:
        per_nm = spec.units_nm or resample.units_to_nm(src.units, where, "wavelength units")
        wl, origin = src.wavelengths * per_nm, src.origin["wavelengths"]
        file_fwhm = None if src.fwhm is None else src.fwhm * per_nm
    else:
        raise ConvertError(
            f"{where}: wavelength: none in the file and no sidecar gives them; expected an ENVI "
            "'wavelength' list with 'wavelength units', per-band wavelength metadata, or a sidecar "
            f"{src.path.with_suffix('.yaml')} with 'wavelengths'"
        )
    if len(wl) != n_bands:
        raise ConvertError(f"{where}: band count: the cube has {n_bands} bands but {len(wl)} "
                           f"wavelengths are given ({origin}); expected one per band")  # fmt: skip
    resample.check_centres(wl, spec.where if spec.wavelengths_nm is not None else where,
                           "wavelengths")  # fmt: skip
    if spec.fwhm_nm is not None:  # already in nm (the sidecar's units)
        fwhm = spec.fwhm_nm
        fwhm = np.full(n_bands, fwhm[0]) if fwhm.size == 1 else fwhm
        fwhm_origin = f"sidecar {spec.where}"
    else:
        fwhm, fwhm_origin = file_fwhm, src.origin.get("fwhm")
    if fwhm is not None and fwhm.size != n_bands:
        raise ConvertError(f"{fwhm_origin}: fwhm: found {fwhm.size} values, expected 1 or "
                           f"{n_bands} (one per band)")  # fmt: skip
    return np.asarray(wl, dtype=np.float64), fwhm, {"from": origin, "fwhm_from": fwhm_origin}


def _scale(src: sources.SourceCube, spec: SceneSpec) -> tuple[float, str]:
    if spec.scale is not None:
        return spec.scale, f"sidecar {spec.where}"
    if src.scale is not None:
        return src.scale, src.origin["scale"]
    if src.cube.dtype.kind == "f":
        top = float(np.nanpercentile(src.cube, 99))
        if top <= 2.0:
            return (
                10000.0,
                f"assumed: float data, 99th percentile {top:.3g} <= 2 read as reflectance 0-1",
            )
        return (
            1.0,
            f"assumed: float data, 99th percentile {top:.3g} > 2 read as reflectance x 10000",
        )
    return 1.0, "assumed: integer data already reflectance x 10000"


def _label(src: sources.SourceCube, spec: SceneSpec, options: Options, hw: tuple[int, int]):
    """(H, W) uint8 label and its record; a label raster must sit on the image's grid."""
    rule = spec.label.rule
    label_path = options.label or (spec.path(spec.label.file) if spec.label.file else None)
    if options.label is not None and rule == "none":
        rule = "as_is"
    raw, where = src.label_raw, f"{src.path} (variable {spec.label.var!r})"
    if label_path is not None:
        raw, transform, crs = sources.read_label_file(label_path)
        where = str(label_path)
        _check_label_grid(label_path, raw.shape, transform, crs, src, hw, rule)
    try:
        label = RULES[rule](raw, hw)
    except ValueError as exc:
        raise ConvertError(f"{where}: label ({rule}): {exc}") from None
    top = int(label.max()) if label.size else 0
    if top > NUM_CLASSES:
        raise ConvertError(f"{where}: label values: found max {top}, expected 0 (unlabelled) to "
                           f"{NUM_CLASSES}")  # fmt: skip
    return label, {"rule": rule, "from": where if rule != "none" else None}


def _check_label_grid(path: Path, shape, transform, crs, src: sources.SourceCube, hw, rule) -> None:
    if rule == "as_is" and tuple(shape) != tuple(hw):
        raise ConvertError(f"{path}: label size: found {shape[0]}x{shape[1]}, expected "
                           f"{hw[0]}x{hw[1]} (the image {src.path})")  # fmt: skip
    if transform is None or src.transform is None:
        return
    fy, fx = shape[0] / hw[0], shape[1] / hw[1]
    expected = src.transform * src.transform.scale(1 / fx, 1 / fy)
    if crs != src.crs or not transform.almost_equals(expected):
        raise ConvertError(f"{path}: label grid: found {crs} {tuple(transform)[:6]}, expected "
                           f"{src.crs} {tuple(expected)[:6]} (the grid of {src.path})")  # fmt: skip


def convert_source(path: Path, spec: SceneSpec | None = None,
                   options: Options = Options()) -> Converted:  # fmt: skip
    """Read one source and resample it to the OHS bands (nothing written)."""
    path = Path(path)
    spec = spec or SceneSpec(where=str(path))
    src = read_source(path, spec)
    h, w, n_bands = src.cube.shape
    wl, fwhm, wl_record = _wavelengths(src, spec, n_bands)
    cube, kept = src.cube, np.ones(n_bands, dtype=bool)
    if src.bad_bands is not None:
        if src.bad_bands.size != n_bands:
            raise ConvertError(f"{path}: bbl: found {src.bad_bands.size} values, expected "
                               f"{n_bands} (one per band)")  # fmt: skip
        kept = ~src.bad_bands
        cube, wl = cube[..., kept], wl[kept]
        fwhm = None if fwhm is None else fwhm[kept]
    method = options.resampling or spec.resampling or "auto"
    plan = resample.plan(wl, fwhm, method, where=str(path))
    limit = next(v for v in (options.max_extrapolated, spec.max_extrapolated,
                             DEFAULT_MAX_EXTRAPOLATED) if v is not None)  # fmt: skip
    if len(plan.extrapolated_nm) > limit:
        raise ConvertError(
            f"{path}: wavelength coverage: {wl[0]:g}-{wl[-1]:g} nm leaves OHS bands "
            f"{[int(c) for c in plan.extrapolated_nm]} nm ({len(plan.extrapolated_nm)} of "
            f"{NUM_BANDS}) to be extrapolated from the edge band; at most {limit} allowed "
            "(set max_extrapolated in the sidecar or convert.max_extrapolated=N to accept)"
        )
    nodata = spec.nodata if spec.nodata is not None else src.nodata
    invalid = np.zeros((h, w), dtype=bool)
    if nodata is not None:
        invalid |= (cube == nodata).any(axis=2)
    if cube.dtype.kind == "f":
        invalid |= ~np.isfinite(cube).all(axis=2)
    if invalid.any():  # filled with 0 and unlabelled; the count is recorded
        cube = np.where(invalid[..., None], 0, cube)
    scale, scale_origin = _scale(src, spec)
    ohs = resample.apply(cube, plan.weights) * scale  # (H, W, 32)
    image = np.clip(np.rint(ohs), INT16_MIN, INT16_MAX).astype(np.int16).transpose(2, 0, 1)
    image = np.ascontiguousarray(image)
    label, label_record = _label(src, spec, options, (h, w))
    if invalid.any():
        image[:, invalid] = 0
        label = np.where(invalid, 0, label).astype(np.uint8)
    name = spec.name or path.stem
    ids, counts = np.unique(label, return_counts=True)
    record = {
        "name": name,
        "source": str(path),
        "kind": src.kind,
        "sidecar": None if spec.where == str(path) else spec.where,
        "sensor": spec.sensor,
        "shape": [h, w],
        "bands_in_file": n_bands,
        "bands_used": int(kept.sum()),
        "bad_bands_dropped": [int(i) + 1 for i in np.flatnonzero(~kept)],
        "wavelengths_nm": {**wl_record, "first": float(wl[0]), "last": float(wl[-1]),
                           "count": int(wl.size)},  # fmt: skip
        "fwhm_nm": None if fwhm is None else {"min": float(np.min(fwhm)),
                                              "max": float(np.max(fwhm))},  # fmt: skip
        "resampling": {"method": plan.method, "notes": plan.notes,
                       "extrapolated_ohs_nm": plan.extrapolated_nm, "max_extrapolated": limit},  # fmt: skip
        "target": {"band_centres_nm": list(BAND_CENTRES_NM)},
        "scale": {"value": scale, "from": scale_origin},
        "nodata": {"value": nodata, "from": src.origin.get("nodata") if spec.nodata is None
                   else f"sidecar {spec.where}", "pixels_filled": int(invalid.sum())},  # fmt: skip
        "label": {**label_record, "pixels": {str(i): int(c) for i, c in zip(ids, counts, strict=True)}},
        "georeference": None if src.transform is None else {
            "crs": None if src.crs is None else src.crs.to_string(),
            "transform": list(src.transform)[:6], "from": src.origin.get("georeference")},
        "notes": spec.notes,
    }  # fmt: skip
    return Converted(name, image, label, src.transform, src.crs, record)


def write_scene(conv: Converted, root: Path, split: str) -> None:
    """``root/<split>/{image,label}/<name>.tif`` + ``root/<split>/meta/<name>.json``."""
    out = Path(root) / split
    write_image(out / "image" / f"{conv.name}.tif", conv.image, conv.transform, conv.crs)
    write_label(out / "label" / f"{conv.name}.tif", conv.label, conv.transform, conv.crs)
    (out / META).mkdir(parents=True, exist_ok=True)
    (out / META / f"{conv.name}.json").write_text(json.dumps(conv.record, indent=1))


# ---------------------------------------------------------------- what to convert


def jobs(src: Path, sidecar: Path | None = None,
         exclude: Path | None = None) -> list[tuple[Path, SceneSpec | None]]:  # fmt: skip
    """(source, sidecar spec) pairs for a file, a sidecar, or every scene in a folder (files under
    ``exclude``, the output folder, are skipped)."""
    src = Path(src)
    if sidecar is not None:
        spec = load_sidecar(Path(sidecar))
        if src.suffix.lower() in SIDECAR_SUFFIXES:
            raise ConvertError(f"{src}: source: a sidecar, expected the cube it describes")
        return [(src, spec)]
    if src.is_file():
        if src.suffix.lower() in SIDECAR_SUFFIXES:
            return [_from_sidecar(src)]
        beside = next((src.with_suffix(s) for s in SIDECAR_SUFFIXES if src.with_suffix(s).is_file()), None)  # fmt: skip
        if beside is None and src.suffix.lower() in sources.ARRAY_SUFFIXES:
            raise ConvertError(f"{src}: sidecar: none found, expected {src.with_suffix('.yaml')} "
                               "(a .mat/.npy cube does not carry wavelengths)")  # fmt: skip
        return [(src, None if beside is None else load_sidecar(beside))]
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such file or folder")
    found: list[tuple[Path, SceneSpec | None]] = []
    claimed: set[Path] = set()
    for path in sorted(p for s in SIDECAR_SUFFIXES for p in src.rglob(f"*{s}")):
        source, spec = _from_sidecar(path)
        found.append((source, spec))
        claimed |= {source.resolve(), source.with_suffix(".hdr").resolve()}
    for path in sorted(src.rglob("*")):
        suffix = path.suffix.lower()
        if not path.is_file() or path.resolve() in claimed or path.name.startswith("."):
            continue
        if exclude is not None and path.resolve().is_relative_to(Path(exclude).resolve()):
            continue
        if suffix == ".hdr" or suffix in (".tif", ".tiff"):
            if suffix != ".hdr" and path.with_suffix(".hdr").is_file():
                continue  # an ENVI data file named .tif: read through its header
            found.append((path, None))
        elif suffix in sources.ARRAY_SUFFIXES:
            raise ConvertError(f"{path}: sidecar: none found, expected {path.with_suffix('.yaml')} "
                               "or a sidecar naming it with 'file:'")  # fmt: skip
    if not found:
        raise ConvertError(f"{src}: no scenes found, expected ENVI .hdr files, GeoTIFFs, or "
                           ".mat/.npy cubes with sidecar .yaml files")  # fmt: skip
    return found


def _from_sidecar(path: Path) -> tuple[Path, SceneSpec]:
    spec = load_sidecar(path)
    if spec.file is not None:
        return spec.path(spec.file), spec
    for suffix in (".hdr", ".tif", ".tiff", ".mat", ".npy"):
        if path.with_suffix(suffix).is_file():
            return path.with_suffix(suffix), spec
    raise ConvertError(f"{path}: file: not given and no cube named {path.stem}.* beside it, "
                       "expected 'file: <cube>'")  # fmt: skip


def convert_path(src: Path, dst: Path, split: str = "tr", sidecar: Path | None = None,
                 options: Options = Options()) -> list[dict[str, Any]]:  # fmt: skip
    """Convert a file or folder into ``dst`` (WHU-OHS layout); returns the per-scene records.

    All scenes are converted before any is moved into place, so an error leaves ``dst`` as it was.
    """
    if split not in SPLITS:
        raise ConvertError(f"split: found {split!r}, expected one of {SPLITS}")
    todo = jobs(Path(src), sidecar, exclude=dst)
    if options.label is not None and len(todo) != 1:
        raise ConvertError(f"label: one label file given for {len(todo)} scenes; name each "
                           "scene's label in its sidecar (label.file) instead")  # fmt: skip
    dst = Path(dst)
    created = not dst.exists()
    staging = dst / f".convert-partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    records: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    try:
        for path, spec in todo:
            conv = convert_source(path, spec, options)
            if conv.name in seen:
                raise ConvertError(f"{path}: name: {conv.name!r} already used by {seen[conv.name]}, "
                                   "expected unique scene names (set name: in a sidecar)")  # fmt: skip
            seen[conv.name] = path
            write_scene(conv, staging, split)
            records.append(conv.record)
        for item in sorted((staging / split).rglob("*")):
            if item.is_file():
                target = dst / item.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()  # a failed first conversion leaves no empty output folder either
    return records


def read_records(root: Path, split: str) -> dict[str, dict[str, Any]]:
    """The per-scene records a conversion left in ``root/<split>/meta`` (empty if none)."""
    folder = Path(root) / split / META
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
