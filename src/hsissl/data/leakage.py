"""Split leakage: the same scene, the same pixels or the same ground in more than one split.

Three checks, run by ingest (``stages/ingest.py``):

- **scene name**: a file name in two splits (the same scene copied, or two crops of one image);
- **footprint**: georeferenced scenes of different splits whose footprints overlap (crops of one
  large image with overlapping windows; compared in the scenes' CRS, or in EPSG:4326 when the
  CRSs differ);
- **tile content**: tiles whose image bytes are identical across splits (BLAKE2b of the tile's
  bytes; constant tiles, e.g. all-zero borders, carry nothing to leak and are skipped).

By default ingest refuses a dataset with any of them, naming the files; with
``data.allow_split_overlap=true`` it ingests and records them in the manifest.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hsissl.data.scenes import SceneHeader, Violation

ALLOW_KEY = "data.allow_split_overlap"
DIGEST_BYTES = 16
MAX_LISTED = 200  # overlaps kept in the manifest (the count is always exact)


@dataclass(frozen=True)
class Overlap:
    kind: str  # "scene name" | "footprint" | "tile content"
    file: str
    split: str
    other: str
    other_split: str
    detail: str

    def violation(self) -> Violation:
        return Violation(self.file, f"split leakage ({self.kind})",
                         f"{self.detail} {self.other} (split {self.other_split!r})",
                         f"no scene, pixels or ground shared between splits ({ALLOW_KEY}=true "
                         "ingests and records it)")  # fmt: skip


def name_overlaps(headers: dict[str, list[SceneHeader]]) -> list[Overlap]:
    first: dict[str, SceneHeader] = {}
    out = []
    for split in headers:
        for h in headers[split]:
            if h.pair.name in first:
                seen = first[h.pair.name]
                out.append(Overlap("scene name", str(h.pair.image), split, str(seen.pair.image),
                                   seen.pair.split, "same scene name as"))  # fmt: skip
            else:
                first[h.pair.name] = h
    return out


def _footprints(headers: dict[str, list[SceneHeader]]) -> list[tuple[str, str, str, tuple]]:
    """(split, file, CRS, (left, bottom, right, top)) of every georeferenced image."""
    import rasterio

    out = []
    for split, hs in headers.items():
        for h in hs:
            with rasterio.open(h.pair.image) as src:
                if src.crs is None or src.transform.is_identity:
                    continue
                out.append((split, str(h.pair.image), src.crs.to_string(), tuple(src.bounds)))
    return out


def footprint_overlaps(headers: dict[str, list[SceneHeader]]) -> list[Overlap]:
    """Georeferenced scenes of different splits whose footprints share area (edges may touch)."""
    feet = _footprints(headers)
    if len({f[0] for f in feet}) < 2:
        return []
    crss = {f[2] for f in feet}
    boxes = np.array([f[3] for f in feet], dtype=np.float64)  # (N, 4)
    if len(crss) > 1:
        from rasterio.warp import transform_bounds

        boxes = np.array([transform_bounds(f[2], "EPSG:4326", *f[3], densify_pts=21) for f in feet])
    # A touch is not an overlap: allow a sliver of a millionth of the smaller side.
    side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    splits = np.array([f[0] for f in feet])
    out = []
    for i in range(len(feet)):
        later = np.arange(i + 1, len(feet))
        later = later[splits[later] != splits[i]]
        if not later.size:
            continue
        w = np.minimum(boxes[i, 2], boxes[later, 2]) - np.maximum(boxes[i, 0], boxes[later, 0])
        h = np.minimum(boxes[i, 3], boxes[later, 3]) - np.maximum(boxes[i, 1], boxes[later, 1])
        tol = 1e-6 * np.minimum(side[i], side[later])
        for j, wj, hj, tj in zip(later, w, h, tol, strict=True):
            if wj > tj and hj > tj:
                area = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
                share = 100.0 * wj * hj / area
                units = "degrees" if len(crss) > 1 else "CRS units"
                out.append(Overlap("footprint", feet[i][1], feet[i][0], feet[j][1], feet[j][0],
                                   f"footprint overlaps by {wj:g} x {hj:g} {units} "
                                   f"({share:.1f} % of this scene) with"))  # fmt: skip
    return out


def tile_digests(tiles: np.ndarray) -> list[bytes | None]:
    """BLAKE2b digest of each (C, T, T) tile's bytes; ``None`` for a constant tile."""
    flat = tiles.reshape(len(tiles), -1)
    constant = (flat == flat[:, :1]).all(axis=1)
    return [None if c else hashlib.blake2b(t.tobytes(), digest_size=DIGEST_BYTES).digest()
            for t, c in zip(tiles, constant, strict=True)]  # fmt: skip


class TileIndex:
    """Tile digests of every split; ``overlaps()`` lists scene pairs sharing identical tiles."""

    def __init__(self) -> None:
        self._first: dict[bytes, tuple[str, str, tuple[int, int]]] = {}
        self._shared: dict[tuple, list] = defaultdict(list)  # (file, split, other, split) -> tiles
        self.constant = 0

    def add(self, split: str, file: str, positions, digests: list[bytes | None]) -> None:
        for pos, digest in zip(positions, digests, strict=True):
            if digest is None:
                self.constant += 1
                continue
            seen = self._first.setdefault(digest, (split, file, tuple(pos)))
            if seen[0] != split:
                self._shared[(file, split, seen[1], seen[0])].append((tuple(pos), seen[2]))

    def overlaps(self) -> list[Overlap]:
        out = []
        for (file, split, other, other_split), pairs in self._shared.items():
            (y, x), (oy, ox) = pairs[0]
            out.append(Overlap("tile content", file, split, other, other_split,
                               f"{len(pairs)} tile(s) identical (e.g. tile at y={y}, x={x} = "
                               f"y={oy}, x={ox}) to tiles of"))  # fmt: skip
        return out


def summary(overlaps: list[Overlap], allowed: bool, constant_tiles: int) -> dict[str, Any]:
    """The manifest's ``leakage`` entry."""
    counts = {
        k: sum(o.kind == k for o in overlaps) for k in ("scene name", "footprint", "tile content")
    }
    return {
        "allowed": allowed,
        "checks": list(counts),
        "counts": counts,
        "constant_tiles_skipped": constant_tiles,
        "overlaps": [asdict(o) for o in overlaps[:MAX_LISTED]],
    }
