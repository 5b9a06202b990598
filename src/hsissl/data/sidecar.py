"""Sidecar YAML: what a cube file does not say about itself (wavelengths, labels, scale).

One schema for a user's sidecar and for the catalogue of shared scenes
(``hsissl/data/catalogue/*.yaml``)::

    name: my_scene                 # output name (default: the source file's stem)
    file: cube.mat                 # the source, relative to the sidecar's folder
    sensor: AVIRIS                 # free text, recorded in the scene's JSON
    cube: data                     # .mat variable holding the cube (omit for .npy / rasters)
    layout: HWB                    # axis order of a .mat/.npy cube: HWB (default) or BHW
    label: {var: gt, rule: as_is}  # or {file: labels.tif, rule: as_is}; rule: as_is | majority
                                   #   | abundance_argmax | none
    wavelengths:                   # either values: [...] or grid: {start, stop, count, removed}
      units: nm                    # nm or micrometers
      grid: {start: 400, stop: 2500, count: 220, removed: [104-108, 150-163, 220]}
    fwhm: 10                       # one width for every band, or one per band (in
                                   #   wavelengths.units; nm when the sidecar gives none)
    scale: 1                       # raw value * scale = reflectance x 10000
    nodata: -9999                  # raw value marking missing pixels
    max_extrapolated: 2            # OHS bands that may be filled from the edge band
    resampling: auto               # auto | linear | gaussian-srf

``removed`` lists 1-based band numbers of the full grid (``a-b`` spans allowed), dropped before
use. For ENVI / GeoTIFF sources every key is optional and overrides the file's own metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hsissl.data.label_rules import RULES
from hsissl.data.resample import METHODS, ConvertError, check_centres, units_to_nm

KEYS = {"name", "file", "sensor", "cube", "layout", "label", "wavelengths", "fwhm", "scale",
        "nodata", "max_extrapolated", "resampling", "notes"}  # fmt: skip
LAYOUTS = ("HWB", "BHW")
DEFAULT_MAX_EXTRAPOLATED = 2  # OHS bands (~30 nm) that may be filled from the edge band


@dataclass(frozen=True)
class LabelSpec:
    rule: str = "none"  # a key of label_rules.RULES
    var: str | None = None  # .mat variable
    file: str | None = None  # label raster / .npy, relative to the sidecar's folder


@dataclass(frozen=True)
class SceneSpec:
    """A parsed sidecar; ``None`` means "take it from the file's own metadata"."""

    where: str  # the sidecar path (for error messages)
    base: Path = Path(".")  # relative paths (file, label.file) resolve against this folder
    name: str | None = None
    file: str | None = None  # the source, as written (relative to ``base``)
    sensor: str | None = None
    cube: str | None = None
    layout: str = "HWB"
    label: LabelSpec = field(default_factory=LabelSpec)
    wavelengths_nm: np.ndarray | None = field(default=None, compare=False)
    units_nm: float | None = None  # nm per unit when only ``wavelengths.units`` is given
    fwhm_nm: np.ndarray | None = field(default=None, compare=False)
    scale: float | None = None
    nodata: float | None = None
    max_extrapolated: int | None = None
    resampling: str | None = None
    notes: str | None = None
    grid_text: str | None = None  # how the wavelengths were given, for the scene's JSON

    def path(self, relative: str) -> Path:
        return (self.base / relative).resolve()


def parse_band_list(items: Any, where: str, field_name: str) -> list[int]:
    """1-based band numbers from ``[3, "104-108", ...]``."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConvertError(f"{where}: {field_name}: found {items!r}, expected a list like [1, 5-8]")
    out: list[int] = []
    for item in items:
        text = str(item).strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
        if m and int(m[1]) <= int(m[2]):
            out += list(range(int(m[1]), int(m[2]) + 1))
        elif text.isdigit() and int(text) >= 1:
            out.append(int(text))
        else:
            raise ConvertError(f"{where}: {field_name}: found {item!r}, expected a band number "
                               "(1-based) or a span a-b")  # fmt: skip
    return out


def _number(value: Any, where: str, field_name: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConvertError(f"{where}: {field_name}: found {value!r}, expected a number")
    if positive and value <= 0:
        raise ConvertError(f"{where}: {field_name}: found {value!r}, expected a number > 0")
    return float(value)


def _wavelengths(raw: Any, where: str) -> tuple[np.ndarray | None, str | None, float]:
    """(centres in nm, how they were given, nm per unit) from the ``wavelengths`` mapping;
    units alone (centres from the file) give ``(None, None, nm per unit)``."""
    if not isinstance(raw, dict):
        raise ConvertError(f"{where}: wavelengths: found {raw!r}, expected a mapping with units "
                           "and values or grid")  # fmt: skip
    unknown = set(raw) - {"units", "values", "grid"}
    if unknown:
        raise ConvertError(f"{where}: wavelengths: unknown keys {sorted(unknown)}, expected "
                           "units, values or grid")  # fmt: skip
    per_nm = units_to_nm(raw.get("units"), where, "wavelengths.units")
    if "values" in raw and "grid" in raw:
        raise ConvertError(f"{where}: wavelengths: expected one of values or grid, not both")
    if "values" not in raw and "grid" not in raw:
        return None, None, per_nm
    if "values" in raw:
        values = raw["values"]
        if not isinstance(values, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise ConvertError(f"{where}: wavelengths.values: expected a list of numbers")
        wl = np.asarray(values, dtype=np.float64) * per_nm
        text = f"{len(values)} listed values ({raw.get('units')})"
    else:
        grid = raw["grid"]
        if not isinstance(grid, dict) or not {"start", "stop", "count"} <= set(grid):
            raise ConvertError(f"{where}: wavelengths.grid: found {grid!r}, expected "
                               "{start, stop, count[, removed]}")  # fmt: skip
        start = _number(grid["start"], where, "wavelengths.grid.start")
        stop = _number(grid["stop"], where, "wavelengths.grid.stop")
        count = grid["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise ConvertError(f"{where}: wavelengths.grid.count: found {count!r}, expected an "
                               "integer >= 2")  # fmt: skip
        removed = parse_band_list(grid.get("removed"), where, "wavelengths.grid.removed")
        bad = [b for b in removed if b > count]
        if bad:
            raise ConvertError(f"{where}: wavelengths.grid.removed: bands {bad} beyond the "
                               f"grid's {count} bands")  # fmt: skip
        full = np.linspace(start, stop, count)
        keep = np.ones(count, dtype=bool)
        keep[np.asarray(removed, dtype=int) - 1] = False
        wl = full[keep] * per_nm
        text = f"linspace({start:g}, {stop:g}, {count}) {raw.get('units')}" + (
            f", {len(set(removed))} bands removed" if removed else ""
        )
    return check_centres(wl, where, "wavelengths"), text, per_nm


def parse(raw: Any, where: str, base: Path) -> SceneSpec:
    """A :class:`SceneSpec` from a loaded YAML mapping; paths resolve against ``base``."""
    if not isinstance(raw, dict):
        raise ConvertError(f"{where}: expected a mapping of sidecar keys, found "
                           f"{type(raw).__name__}")  # fmt: skip
    unknown = set(raw) - KEYS
    if unknown:
        raise ConvertError(f"{where}: unknown keys {sorted(unknown)}, expected some of "
                           f"{sorted(KEYS)}")  # fmt: skip
    kw: dict[str, Any] = {"where": where, "base": base}
    for key in ("name", "sensor", "cube", "notes"):
        if raw.get(key) is not None:
            kw[key] = str(raw[key])
    if raw.get("file") is not None:
        kw["file"] = str(raw["file"])
    layout = raw.get("layout", "HWB")
    if layout not in LAYOUTS:
        raise ConvertError(f"{where}: layout: found {layout!r}, expected one of {LAYOUTS}")
    kw["layout"] = layout
    label = raw.get("label")
    if label is not None:
        if not isinstance(label, dict) or set(label) - {"var", "file", "rule"}:
            raise ConvertError(f"{where}: label: found {label!r}, expected {{var or file, rule}}")
        rule = label.get("rule", "as_is")
        if rule not in RULES:
            raise ConvertError(f"{where}: label.rule: found {rule!r}, expected one of "
                               f"{' | '.join(RULES)}")  # fmt: skip
        if rule != "none" and label.get("var") is None and label.get("file") is None:
            raise ConvertError(f"{where}: label: rule {rule!r} needs a var or a file")
        file = label.get("file")
        kw["label"] = LabelSpec(rule, label.get("var"), None if file is None else str(file))
    per_nm = 1.0
    if raw.get("wavelengths") is not None:
        kw["wavelengths_nm"], kw["grid_text"], per_nm = _wavelengths(raw["wavelengths"], where)
        kw["units_nm"] = per_nm
    if raw.get("fwhm") is not None:
        fwhm = raw["fwhm"]
        values = fwhm if isinstance(fwhm, list) else [fwhm]
        widths = [_number(v, where, "fwhm", positive=True) for v in values]
        kw["fwhm_nm"] = np.asarray(widths) * per_nm
    for key in ("scale", "nodata"):
        if raw.get(key) is not None:
            kw[key] = _number(raw[key], where, key, positive=key == "scale")
    if raw.get("max_extrapolated") is not None:
        n = raw["max_extrapolated"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConvertError(f"{where}: max_extrapolated: found {n!r}, expected an integer >= 0")
        kw["max_extrapolated"] = n
    if raw.get("resampling") is not None:
        if raw["resampling"] not in METHODS:
            raise ConvertError(f"{where}: resampling: found {raw['resampling']!r}, expected one "
                               f"of {' | '.join(METHODS)}")  # fmt: skip
        kw["resampling"] = raw["resampling"]
    return SceneSpec(**kw)


def load(path: Path, base: Path | None = None) -> SceneSpec:
    """Read and parse the sidecar at ``path``; relative paths resolve against ``base`` (default:
    the sidecar's folder)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConvertError(f"{path}: not a readable YAML sidecar ({exc})") from None
    return parse(raw, str(path), (base or path.parent).resolve())
