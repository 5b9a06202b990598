"""Read a hyperspectral cube and what it says about itself: ENVI, any rasterio raster, .mat, .npy.

ENVI (``.hdr`` + binary: any interleave, data type, byte order, header offset) and GeoTIFF are
read by GDAL through rasterio, which also turns ENVI ``map info`` / ``coordinate system string``
into the transform and CRS. Wavelengths, FWHM, bad bands, data ignore value and reflectance
scale factor come from the ENVI header (GDAL's ``ENVI`` metadata domain) or, for other rasters,
from per-band metadata (``wavelength`` + ``wavelength_units`` tags, GDAL's ``IMAGERY`` domain,
or band descriptions such as ``"450 nm"``). ``.mat`` / ``.npy`` cubes carry none of this: their
sidecar supplies it. Every fact records where it came from (``SourceCube.origin``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hsissl.data.resample import ConvertError, units_to_nm
from hsissl.data.sidecar import SceneSpec

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2", ".nc")
ARRAY_SUFFIXES = (".mat", ".npy")
# ENVI data files next to a .hdr: same stem with one of these, or no suffix at all.
ENVI_DATA_SUFFIXES = ("", ".img", ".dat", ".bsq", ".bil", ".bip", ".raw", ".bin", ".envi")


@dataclass
class SourceCube:
    """A source cube as found; ``None`` = the file does not say."""

    path: Path
    kind: str  # envi | raster | mat | npy
    cube: np.ndarray  # (H, W, B) raw values
    wavelengths: np.ndarray | None = None  # band centres in ``units``
    fwhm: np.ndarray | None = None  # band widths in ``units``
    units: str | None = None  # the file's wavelength units, as written (None: not given)
    bad_bands: np.ndarray | None = None  # (B,) bool, True = listed bad (ENVI bbl = 0)
    nodata: float | None = None
    scale: float | None = None  # raw * scale = reflectance x 10000
    transform: Any = None  # affine.Affine or None
    crs: Any = None  # rasterio CRS or None
    label_raw: np.ndarray | None = None  # a .mat label variable
    origin: dict[str, str] = field(default_factory=dict)  # fact -> where it came from


def envi_list(text: str | None) -> list[str] | None:
    """``"{ 0.45, 0.55,\\n 0.65}"`` -> ``["0.45", "0.55", "0.65"]`` (ENVI brace lists)."""
    if text is None:
        return None
    return [t.strip() for t in text.strip().strip("{}").split(",") if t.strip()]


def _floats(items: list[str] | None, where: str, field_name: str) -> np.ndarray | None:
    if items is None:
        return None
    try:
        return np.asarray([float(v) for v in items], dtype=np.float64)
    except ValueError:
        raise ConvertError(f"{where}: {field_name}: found non-numeric values {items[:5]}, "
                           "expected numbers") from None  # fmt: skip


def envi_data_file(hdr: Path) -> Path:
    """The binary file an ENVI header describes (same stem, usual suffixes)."""
    for suffix in ENVI_DATA_SUFFIXES:
        candidate = hdr.with_suffix(suffix)
        if candidate != hdr and candidate.is_file():
            return candidate
    raise ConvertError(f"{hdr}: ENVI data file: none found, expected {hdr.with_suffix('')}"
                       f"{{{','.join(s for s in ENVI_DATA_SUFFIXES if s)}}} beside the header")  # fmt: skip


def _rasterio():
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    return rasterio


def read_raster(path: Path) -> SourceCube:
    """ENVI (``path`` = header or data file) or any GDAL raster, with its spectral metadata."""
    rasterio = _rasterio()
    path = Path(path)
    data_path = envi_data_file(path) if path.suffix.lower() == ".hdr" else path
    try:
        src = rasterio.open(data_path)
    except rasterio.errors.RasterioError as exc:
        raise ConvertError(f"{data_path}: file: unreadable by GDAL ({exc}), expected ENVI "
                           "(.hdr + binary) or a GeoTIFF") from None  # fmt: skip
    with src:
        where = str(path)
        cube = src.read().transpose(1, 2, 0)  # (H, W, B)
        out = SourceCube(path, "envi" if src.driver == "ENVI" else "raster", cube)
        if not (src.transform.is_identity and src.crs is None):
            out.transform, out.crs = src.transform, src.crs
            out.origin["georeference"] = "ENVI map info" if out.kind == "envi" else "GeoTIFF"
        if src.nodata is not None:
            out.nodata = float(src.nodata)
            out.origin["nodata"] = ("ENVI data ignore value" if out.kind == "envi"
                                    else "raster nodata")  # fmt: skip
        if out.kind == "envi":
            _envi_metadata(src.tags(ns="ENVI"), where, out)
        else:
            _band_metadata(src, where, out)
    return out


def _envi_metadata(tags: dict[str, str], where: str, out: SourceCube) -> None:
    """Wavelength (+ units), fwhm, bbl and reflectance scale factor from the ENVI header."""
    # Units are checked by the converter, once a sidecar has had its say.
    out.units = tags.get("wavelength_units")
    out.wavelengths = _floats(envi_list(tags.get("wavelength")), where, "wavelength")
    if out.wavelengths is not None:
        out.origin["wavelengths"] = f"ENVI header wavelength ({out.units or 'no units given'})"
    out.fwhm = _floats(envi_list(tags.get("fwhm")), where, "fwhm")
    if out.fwhm is not None:
        out.origin["fwhm"] = "ENVI header fwhm"
    bbl = _floats(envi_list(tags.get("bbl")), where, "bbl")
    if bbl is not None:
        out.bad_bands = bbl == 0
        out.origin["bad_bands"] = "ENVI header bbl"
    rsf = tags.get("reflectance_scale_factor")
    if rsf is not None:
        factor = _floats([rsf], where, "reflectance scale factor")[0]
        if factor <= 0:
            raise ConvertError(f"{where}: reflectance scale factor: found {rsf}, expected > 0")
        out.scale = 10000.0 / factor  # ENVI: value / factor = reflectance (0-1)
        out.origin["scale"] = f"ENVI header reflectance scale factor {rsf}"


_DESCRIPTION = re.compile(r"([0-9]*\.?[0-9]+)\s*(nm|nanometers?|um|µm|μm|micrometers?|microns?)",
                          re.IGNORECASE)  # fmt: skip


def _band_metadata(src: Any, where: str, out: SourceCube) -> None:
    """Per-band wavelengths of a GeoTIFF: band tags, IMAGERY domain, ENVI-style dataset tags or
    band descriptions (first source that covers every band wins)."""
    n = src.count
    tags = [src.tags(b) for b in range(1, n + 1)]
    imagery = [src.tags(b, ns="IMAGERY") for b in range(1, n + 1)]
    candidates: list[tuple[str, list[float | None], list[float | None]]] = []
    if all("wavelength" in t for t in tags):
        nm = [_tag_nm(t["wavelength"], t.get("wavelength_units") or src.tags().get(
            "wavelength_units"), where, b + 1) for b, t in enumerate(tags)]  # fmt: skip
        fw = [_tag_nm(t["fwhm"], t.get("wavelength_units") or src.tags().get("wavelength_units"),
                      where, b + 1) if "fwhm" in t else None for b, t in enumerate(tags)]  # fmt: skip
        candidates.append(("band metadata wavelength", nm, fw))
    if all("CENTRAL_WAVELENGTH_UM" in t for t in imagery):
        nm = [float(t["CENTRAL_WAVELENGTH_UM"]) * 1000 for t in imagery]
        fw = [float(t["FWHM_UM"]) * 1000 if "FWHM_UM" in t else None for t in imagery]
        candidates.append(("GDAL IMAGERY CENTRAL_WAVELENGTH_UM", nm, fw))
    top = src.tags()
    if "wavelength" in top:
        per_nm = units_to_nm(top.get("wavelength_units"), where, "wavelength_units")
        wl = _floats(envi_list(top["wavelength"]), where, "wavelength")
        fw = _floats(envi_list(top.get("fwhm")), where, "fwhm")
        candidates.append(("dataset metadata wavelength", list(wl * per_nm),
                           list(fw * per_nm) if fw is not None else [None] * len(wl)))  # fmt: skip
    matches = [_DESCRIPTION.search(d or "") for d in src.descriptions]
    if all(matches):
        nm = [float(m[1]) * units_to_nm(m[2], where) for m in matches]
        candidates.append(("band descriptions", nm, [None] * n))
    for origin, nm, fw in candidates:
        if len(nm) != n:
            raise ConvertError(f"{where}: wavelength ({origin}): found {len(nm)} values, "
                               f"expected {n} (one per band)")  # fmt: skip
        out.wavelengths, out.units = np.asarray(nm, dtype=np.float64), "nm"
        out.origin["wavelengths"] = origin
        if all(f is not None for f in fw):
            out.fwhm = np.asarray(fw, dtype=np.float64)
            out.origin["fwhm"] = origin
        return


def _tag_nm(value: str, units: str | None, where: str, band: int) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConvertError(f"{where}: band {band} wavelength: found {value!r}, expected a "
                           "number") from None  # fmt: skip
    return number * units_to_nm(units, where, f"band {band} wavelength_units")


def read_array(path: Path, spec: SceneSpec) -> SourceCube:
    """A .mat variable or .npy array, axis order from the sidecar (``layout``)."""
    path = Path(path)
    label_raw = None
    if path.suffix.lower() == ".npy":
        try:
            cube = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConvertError(f"{path}: file: unreadable .npy ({exc})") from None
        origin = {"cube": f"{path.name}"}
    else:
        mat = _loadmat(path)
        arrays = {k: v for k, v in mat.items() if not k.startswith("__")}
        name = spec.cube
        if name is None:
            cubes = [k for k, v in arrays.items() if np.ndim(v) == 3]
            if len(cubes) != 1:
                raise ConvertError(f"{spec.where}: cube: not given and {path} holds "
                                   f"{len(cubes)} 3-D variables {cubes}, expected the name of "
                                   "the (H, W, B) variable")  # fmt: skip
            name = cubes[0]
        cube = _variable(arrays, path, name, "cube")
        origin = {"cube": f"variable {name!r}" + ("" if spec.cube else " (the only 3-D one)")}
        if spec.label.var is not None:
            label_raw = _variable(arrays, path, spec.label.var, "label.var")
    if cube.ndim != 3:
        raise ConvertError(f"{path}: cube: found shape {cube.shape}, expected 3 axes "
                           f"({spec.layout})")  # fmt: skip
    if spec.layout == "BHW":
        cube = cube.transpose(1, 2, 0)
    return SourceCube(path, path.suffix.lower().lstrip("."), cube, label_raw=label_raw,
                      origin=origin)  # fmt: skip


def _loadmat(path: Path) -> dict[str, Any]:
    import scipy.io

    try:
        return scipy.io.loadmat(path)
    except NotImplementedError:
        raise ConvertError(f"{path}: file: MATLAB v7.3 (HDF5) is not read here, expected a "
                           "v5/v7 .mat (save with -v7) or a .npy") from None  # fmt: skip
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{path}: file: unreadable .mat ({exc})") from None


def _variable(arrays: dict[str, Any], path: Path, var: str, field_name: str) -> np.ndarray:
    if var not in arrays:
        raise ConvertError(f"{path}: {field_name}: no variable {var!r}; found {sorted(arrays)}")
    return np.asarray(arrays[var])


def read_label_file(path: Path) -> tuple[np.ndarray, Any, Any]:
    """(label array, transform or None, crs or None) from a raster or .npy label file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: label file: not found")
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False), None, None
    rasterio = _rasterio()
    try:
        with rasterio.open(path) as src:
            if src.count != 1:
                raise ConvertError(f"{path}: label band count: found {src.count}, expected 1")
            georef = not (src.transform.is_identity and src.crs is None)
            return (src.read(1), src.transform if georef else None,
                    src.crs if georef else None)  # fmt: skip
    except rasterio.errors.RasterioError as exc:
        raise ConvertError(f"{path}: label file: unreadable ({exc})") from None
