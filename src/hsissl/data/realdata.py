"""The shared real .mat scenes (see ../shared/data/README.md): a catalogue of sidecar files.

Each scene is one YAML file in ``hsissl/data/catalogue/`` (the sidecar schema of
``hsissl.data.sidecar``; ``file`` is relative to the data root), converted by the same code as
a user's sidecar (``hsissl.data.convert``). Adding a scene means adding one file. None of these
scenes is OHS imagery: the grids, scales and label rules are documented approximations
(docs/real-data.md), good for pretraining and evaluation sanity checks, not OHS truth.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from hsissl.data import sidecar
from hsissl.data.convert import convert_source, write_scene
from hsissl.data.ohs import SPLITS
from hsissl.data.sidecar import SceneSpec

CATALOGUE = Path(__file__).resolve().parent / "catalogue"


def load_catalogue(folder: Path = CATALOGUE) -> dict[str, SceneSpec]:
    """Scene name -> spec for every ``*.yaml`` in ``folder`` (names must be unique)."""
    scenes: dict[str, SceneSpec] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        spec = sidecar.load(path)
        if spec.file is None:
            raise ValueError(f"{path}: file: missing, expected the .mat path below the data root")
        name = spec.name or Path(spec.file).stem
        if name in scenes:
            raise ValueError(f"{path}: name: {name!r} also defined by {scenes[name].where}")
        scenes[name] = spec
    return scenes


SCENES: dict[str, SceneSpec] = load_catalogue()


def is_labelled(spec: SceneSpec) -> bool:
    return spec.label.rule != "none"


def _locate(root: Path, spec: SceneSpec) -> Path:
    """``root/<file>`` if present, else the first file of that name anywhere below ``root``."""
    direct = Path(root) / spec.file
    if direct.is_file():
        return direct
    found = sorted(Path(root).rglob(Path(spec.file).name))
    if not found:
        raise FileNotFoundError(f"{root}: no {Path(spec.file).name} (scene {spec.name!r}, "
                                f"{spec.where})")  # fmt: skip
    return found[0]


def load_scene(root: Path, spec: SceneSpec) -> tuple[np.ndarray, np.ndarray]:
    """Read ``spec``'s file below ``root``: ((32, H, W) int16 reflectance x 10000, (H, W) uint8)."""
    conv = convert_source(_locate(Path(root), spec), spec)
    return conv.image, conv.label


def _known_files(src: Path, catalogue: dict[str, SceneSpec]) -> dict[str, Path]:
    """Known scene name -> .mat path below ``src``; unknown .mat files are warned about."""
    by_file = {Path(s.file).stem: name for name, s in catalogue.items()}
    found: dict[str, Path] = {}
    for path in sorted(Path(src).rglob("*.mat")):
        name = by_file.get(path.stem)
        if name is None:
            warnings.warn(f"{path}: not a known scene (known: {sorted(catalogue)}); skipped",
                          stacklevel=3)  # fmt: skip
        elif name in found:
            warnings.warn(f"{path}: duplicate of {found[name]}; skipped", stacklevel=3)
        else:
            found[name] = path
    return found


def is_mat_folder(path: Path, catalogue: dict[str, SceneSpec] | None = None) -> bool:
    """True if ``path`` is a directory holding (at any depth) at least one catalogued .mat file."""
    stems = {Path(s.file).stem for s in (catalogue or SCENES).values()}
    path = Path(path)
    return path.is_dir() and any(p.stem in stems for p in path.rglob("*.mat"))


def convert_mat_folder(src: Path, dst: Path, split: str = "tr", names: list[str] | None = None,
                       catalogue: dict[str, SceneSpec] | None = None) -> list[str]:  # fmt: skip
    """Write every catalogued scene below ``src`` (or just ``names``) into ``dst/<split>``.

    Returns the converted scene names. Raises if none is found or a requested one is missing.
    """
    catalogue = SCENES if catalogue is None else catalogue
    if split not in SPLITS:
        raise ValueError(f"split: found {split!r}, expected one of {SPLITS}")
    unknown = sorted(set(names or ()) - set(catalogue))
    if unknown:
        raise ValueError(f"names: unknown scenes {unknown}, expected some of {sorted(catalogue)}")
    found = _known_files(Path(src), catalogue)
    wanted = list(catalogue) if names is None else list(names)
    missing = [n for n in wanted if n not in found] if names is not None else []
    if missing:
        raise FileNotFoundError(f"{src}: requested scenes {missing} not found")
    todo = [n for n in wanted if n in found]
    if not todo:
        raise FileNotFoundError(
            f"{src}: no known .mat scene found, expected some of {sorted(catalogue)}"
        )
    for name in todo:
        write_scene(convert_source(found[name], catalogue[name]), Path(dst), split)
    return todo
