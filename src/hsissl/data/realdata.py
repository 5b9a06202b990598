"""Convert the small real .mat scenes (see ../shared/data/README.md) into the WHU-OHS layout.

None of these scenes is OHS imagery: each is resampled to the 32 OHS band centres by linear
interpolation over wavelength, scaled to reflectance x 10000 and written as
``<dst>/<split>/image/<name>.tif`` (32, H, W) int16 + ``<dst>/<split>/label/<name>.tif`` (H, W)
uint8. The assumed wavelength grids, scales and label rules are documented in docs/real-data.md;
they are approximations, good for pretraining / evaluation sanity checks, not OHS truth.
Label IDs are the source data set's own (e.g. Indian Pines 2, 6, 10, 11), not WHU-OHS classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.io

from hsissl.data.geotiff import write_image, write_label
from hsissl.data.ohs import BAND_CENTRES_NM, NUM_CLASSES, SPLITS

INT16_MIN, INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max

# (raw label variable or None, (H, W) of the HSI grid) -> (H, W) uint8 label map.
LabelFn = Callable[[np.ndarray | None, tuple[int, int]], np.ndarray]


# ---------------------------------------------------------------- label rules


def labels_as_is(raw: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    """Ground truth already on the HSI grid (Indian Pines ``gt``)."""
    if raw is None or raw.shape != hw:
        found = None if raw is None else raw.shape
        raise ValueError(f"label map: found shape {found}, expected {hw}")
    return raw.astype(np.uint8)


def majority_downsample(raw: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    """Majority label of each (f x f) block, f = label size / HSI size (Houston: 512 -> 128, f=4).

    Unlabelled (0) votes like any class; ties go to the smallest ID, so a block split evenly
    between background and a class stays unlabelled (conservative).
    """
    if raw is None or raw.ndim != 2 or raw.shape[0] % hw[0] or raw.shape[1] % hw[1]:
        found = None if raw is None else raw.shape
        raise ValueError(f"label map: found shape {found}, expected a multiple of {hw}")
    fy, fx = raw.shape[0] // hw[0], raw.shape[1] // hw[1]
    blocks = raw.reshape(hw[0], fy, hw[1], fx).transpose(0, 2, 1, 3).reshape(-1, fy * fx)
    n_ids = int(raw.max()) + 1
    # Per-block histogram via offsets: block k's label l lands in bin k * n_ids + l.
    offsets = np.arange(blocks.shape[0])[:, None] * n_ids
    counts = np.bincount((blocks + offsets).ravel(), minlength=blocks.shape[0] * n_ids)
    return counts.reshape(-1, n_ids).argmax(axis=1).reshape(hw).astype(np.uint8)  # (H, W)


def abundance_argmax(raw: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    """Dominant endmember + 1 from an (H, W, K) abundance cube (Samson: 1 rock, 2 tree, 3 water)."""
    if raw is None or raw.shape[:2] != hw or raw.ndim != 3:
        found = None if raw is None else raw.shape
        raise ValueError(f"abundances: found shape {found}, expected {hw} + (K,)")
    return (raw.argmax(axis=2) + 1).astype(np.uint8)


def all_unlabelled(raw: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    """ABU scenes: a binary anomaly map is no land-cover label, so every pixel is 0."""
    return np.zeros(hw, dtype=np.uint8)


# ---------------------------------------------------------------- scene table


def _grid(
    start_nm: float, stop_nm: float, n: int, removed_1based: Sequence[int] = ()
) -> np.ndarray:
    """Uniform grid of ``n`` band centres with the listed (1-based) bands removed, read-only."""
    full = np.linspace(start_nm, stop_nm, n)
    keep = np.ones(n, dtype=bool)
    keep[np.asarray(removed_1based, dtype=int) - 1] = False
    grid = full[keep]
    grid.setflags(write=False)
    return grid


def _span(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


# AVIRIS water/overlap bands removed from the 224-band San Diego cube (-> 189), a common list.
_SANDIEGO_REMOVED = _span(1, 6) + _span(33, 35) + [97] + _span(107, 113) + _span(153, 166)
_SANDIEGO_REMOVED += _span(221, 224)
# abu-urban-2 keeps the low bands (its 760/940/1130 nm absorptions sit at file bands 39-43/62/81,
# too late for any removal below 700 nm), so we assume only the >1000 nm ones above went (-> 198).
_URBAN2_REMOVED = [97] + _span(107, 113) + _span(153, 166) + _span(221, 224)


@dataclass(frozen=True)
class MatScene:
    """One known .mat file: where its cube and labels live and how to turn them into OHS form."""

    name: str  # file stem, also the output .tif name
    relpath: str  # path below the shared data root
    cube_var: str  # (H, W, B) variable
    label_var: str | None  # variable handed to label_fn (None: label_fn needs no input)
    wavelengths_nm: np.ndarray = field(compare=False)  # (B,) assumed band centres, increasing
    scale: float  # raw value * scale = reflectance x 10000
    label_fn: LabelFn = field(compare=False)


SCENES: dict[str, MatScene] = {
    s.name: s
    for s in (
        # AVIRIS 1992, 220-band grid 400-2500 nm minus water bands (README: 200 bands).
        MatScene(
            "Indian_subset", "IndianPines_subset/Indian_subset.mat", "Indian_subset", "gt",
            _grid(400, 2500, 220, _span(104, 108) + _span(150, 163) + [220]), 1.0, labels_as_is,
        ),
        # ITRES CASI-1500 (DFC2018): 48 bands 380-1050 nm; labels on a 4x finer grid.
        MatScene(
            "houston_dataset", "Houston2018_subset/houston_dataset.mat", "hyprImg", "clasLabs",
            _grid(380, 1050, 48), 1.0, majority_downsample,
        ),
        # SAMSON sensor: 156 bands 401-889 nm, data max-normalised to 0-1.
        MatScene(
            "Samson", "Samson/Samson.mat", "SamSon", "A",
            _grid(401, 889, 156), 10000.0, abundance_argmax,
        ),
        # ROSIS-03 (Pavia): 102 kept bands approximated as uniform over 430-860 nm, 0-1 scaled.
        MatScene(
            "abu-beach-4", "ABU_anomaly/abu-beach-4.mat", "data", None,
            _grid(430, 860, 102), 10000.0, all_unlabelled,
        ),
        # AVIRIS 224-band grid ~370-2510 nm, 26 bands >1000 nm removed (assumption).
        MatScene(
            "abu-urban-2", "ABU_anomaly/abu-urban-2.mat", "data", None,
            _grid(370, 2510, 224, _URBAN2_REMOVED), 1.0, all_unlabelled,
        ),
        MatScene(
            "sandiego_plane", "ABU_anomaly/sandiego_plane.mat", "data", None,
            _grid(370, 2510, 224, _SANDIEGO_REMOVED), 1.0, all_unlabelled,
        ),
        # HYDICE urban: 210 bands 400-2500 nm, the standard 162-band removal list; raw 0..592,
        # scale 12 puts the scene's 99th percentile (415) at ~5000.
        MatScene(
            "HYDICE_data", "ABU_anomaly/HYDICE_data.mat", "data", None,
            _grid(400, 2500, 210, _span(1, 4) + [76, 87] + _span(101, 111) + _span(136, 153)
                  + _span(198, 210)),
            12.0, all_unlabelled,
        ),
    )
}  # fmt: skip


# ---------------------------------------------------------------- resampling


def interpolation_weights(
    wavelengths_nm: np.ndarray, targets_nm: tuple[float, ...] = BAND_CENTRES_NM
) -> np.ndarray:
    """(B, T) matrix W with spectrum @ W = linear interpolation of the spectrum at ``targets_nm``.

    Targets outside [first, last] band take the nearest edge band (weight 1).
    """
    wl = np.asarray(wavelengths_nm, dtype=np.float64)
    if wl.ndim != 1 or wl.size < 2 or not np.all(np.diff(wl) > 0):
        raise ValueError(
            f"wavelengths_nm: expected >= 2 strictly increasing centres, got {wl.size} values "
            f"(first {wl[:3].tolist()})"
        )
    t = np.clip(np.asarray(targets_nm, dtype=np.float64), wl[0], wl[-1])  # edge extrapolation
    upper = np.clip(np.searchsorted(wl, t, side="right"), 1, wl.size - 1)  # (T,)
    lower = upper - 1
    frac = (t - wl[lower]) / (wl[upper] - wl[lower])  # (T,) 0 at lower, 1 at upper
    weights = np.zeros((wl.size, t.size))
    cols = np.arange(t.size)
    weights[lower, cols] += 1.0 - frac
    weights[upper, cols] += frac
    return weights


def extrapolated_bands(wavelengths_nm: np.ndarray) -> list[int]:
    """OHS band centres (nm) outside the file's wavelength range (filled from the edge band)."""
    lo, hi = float(np.min(wavelengths_nm)), float(np.max(wavelengths_nm))
    return [c for c in BAND_CENTRES_NM if c < lo or c > hi]


def resample_to_ohs(cube: np.ndarray, wavelengths_nm: np.ndarray) -> np.ndarray:
    """(H, W, B) cube -> (H, W, 32) float64, linearly interpolated at the OHS band centres."""
    if cube.ndim != 3 or cube.shape[2] != len(wavelengths_nm):
        raise ValueError(
            f"cube: found shape {cube.shape}, expected (H, W, {len(wavelengths_nm)}) to match "
            f"the wavelength grid"
        )
    h, w, b = cube.shape
    weights = interpolation_weights(wavelengths_nm)  # (B, 32)
    flat = cube.reshape(-1, b).astype(np.float64)  # (H*W, B)
    return (flat @ weights).reshape(h, w, weights.shape[1])  # (H, W, 32)


# ---------------------------------------------------------------- loading / conversion


def _locate(root: Path, scene: MatScene) -> Path:
    """``root/relpath`` if present, else the first file of that name anywhere below ``root``."""
    direct = root / scene.relpath
    if direct.is_file():
        return direct
    found = sorted(root.rglob(Path(scene.relpath).name))
    if not found:
        raise FileNotFoundError(f"{root}: no {Path(scene.relpath).name} (scene {scene.name!r})")
    return found[0]


def _variable(mat: dict, path: Path, var: str) -> np.ndarray:
    if var not in mat:
        have = sorted(k for k in mat if not k.startswith("__"))
        raise KeyError(f"{path}: no variable {var!r}; found {have}")
    return np.asarray(mat[var])


def load_scene(root: Path, scene: MatScene) -> tuple[np.ndarray, np.ndarray]:
    """Read ``scene`` below ``root``: ((32, H, W) int16 reflectance x 10000, (H, W) uint8 labels)."""
    path = _locate(Path(root), scene)
    mat = scipy.io.loadmat(path)
    cube = _variable(mat, path, scene.cube_var)  # (H, W, B)
    if cube.ndim != 3 or cube.shape[2] != len(scene.wavelengths_nm):
        raise ValueError(
            f"{path}: {scene.cube_var!r} has shape {cube.shape}, expected "
            f"(H, W, {len(scene.wavelengths_nm)}) for the assumed wavelength grid"
        )
    if not np.all(np.isfinite(cube)):
        raise ValueError(f"{path}: {scene.cube_var!r} holds NaN/inf values, expected finite data")
    ohs = resample_to_ohs(cube, scene.wavelengths_nm) * scene.scale  # (H, W, 32)
    image = np.clip(np.rint(ohs), INT16_MIN, INT16_MAX).astype(np.int16).transpose(2, 0, 1)
    raw_label = None if scene.label_var is None else _variable(mat, path, scene.label_var)
    label = scene.label_fn(raw_label, cube.shape[:2])  # (H, W) uint8
    if label.dtype != np.uint8 or label.shape != cube.shape[:2] or label.max() > NUM_CLASSES:
        raise ValueError(
            f"{path}: derived label {label.dtype} {label.shape} max {label.max()}, expected "
            f"uint8 {cube.shape[:2]} with IDs <= {NUM_CLASSES}"
        )
    return np.ascontiguousarray(image), label


def _known_files(src: Path) -> dict[str, Path]:
    """Known scene name -> .mat path below ``src``; unknown .mat files are warned about."""
    found: dict[str, Path] = {}
    for path in sorted(Path(src).rglob("*.mat")):
        if path.stem not in SCENES:
            warnings.warn(f"{path}: not a known scene (known: {sorted(SCENES)}); skipped",
                          stacklevel=3)  # fmt: skip
        elif path.stem in found:
            warnings.warn(f"{path}: duplicate of {found[path.stem]}; skipped", stacklevel=3)
        else:
            found[path.stem] = path
    return found


def is_mat_folder(path: Path) -> bool:
    """True if ``path`` is a directory holding (at any depth) at least one known .mat scene."""
    path = Path(path)
    return path.is_dir() and any(p.stem in SCENES for p in path.rglob("*.mat"))


def convert_mat_folder(
    src: Path, dst: Path, split: str = "tr", names: list[str] | None = None
) -> list[str]:
    """Write every known scene below ``src`` (or just ``names``) into ``dst/<split>/{image,label}``.

    Returns the converted scene names. Raises if none is found or a requested one is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"split: found {split!r}, expected one of {SPLITS}")
    unknown = sorted(set(names or ()) - set(SCENES))
    if unknown:
        raise ValueError(f"names: unknown scenes {unknown}, expected some of {sorted(SCENES)}")
    found = _known_files(Path(src))
    wanted = list(SCENES) if names is None else list(names)
    missing = [n for n in wanted if n not in found] if names is not None else []
    if missing:
        raise FileNotFoundError(f"{src}: requested scenes {missing} not found")
    todo = [n for n in wanted if n in found]
    if not todo:
        raise FileNotFoundError(
            f"{src}: no known .mat scene found, expected some of {sorted(SCENES)}"
        )
    out = Path(dst) / split
    for name in todo:
        image, label = load_scene(
            found[name].parent, replace(SCENES[name], relpath=found[name].name)
        )
        # No georeference: transform=None writes plain (ungeoreferenced) GeoTIFFs.
        write_image(out / "image" / f"{name}.tif", image, transform=None)
        write_label(out / "label" / f"{name}.tif", label, transform=None)
    return todo
