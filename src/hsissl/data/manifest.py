"""The dataset manifest: the one JSON file that describes a committed dataset.

``hsissl ingest`` writes it last, as the commit marker of ``datasets/<name>/``; every reader
(:class:`hsissl.data.shards.ShardDataset`, the report) reads it through :func:`read`. It lists
per split the tiles, scenes, class pixel counts and shard files (key, sha256, bytes), the band
statistics and the Normalizer computed from them, and the data config of the ingest.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np

from hsissl.data import ohs
from hsissl.data.normalize import Normalizer
from hsissl.data.stats import BandStats
from hsissl.storage import Storage

FORMAT = "hsissl-shards/1"
MANIFEST = "manifest.json"


def file_entry(key: str, sha256: str, size: int) -> dict[str, Any]:
    """One shard file: its key under the dataset, checksum and size."""
    return {"key": key, "sha256": sha256, "bytes": size}


def shard_entry(count: int, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One shard: its tile count and ``{"images"|"labels"|"sources": file_entry}``."""
    return {"count": count, "files": files}


def split_entry(tiles: int, scenes: list[str], class_pixels: np.ndarray,
                shards: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    return {
        "tiles": tiles,
        "scenes": scenes,
        "class_pixels": class_pixels.tolist(),
        "shards": shards,
    }


def new_manifest(*, fingerprint: str, source: str, tile_size: int, stride: int,
                 splits: dict[str, Any], stats: BandStats, normalizer: Normalizer,
                 leakage: dict[str, Any], conversion: dict[str, Any],
                 config: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The manifest of a dataset just written (key order is the file's)."""
    return {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "source": source,
        "bands": ohs.NUM_BANDS,
        "band_centres_nm": list(ohs.BAND_CENTRES_NM),
        "tile_size": tile_size,
        "stride": stride,
        "dtype": "int16",
        "label_dtype": "uint8",
        "num_classes": ohs.NUM_CLASSES,
        "class_names": list(ohs.CLASS_NAMES),
        "splits": splits,
        "band_stats": {
            "split": "tr",
            "pixels": stats.count,
            "mean": stats.mean(),
            "std": stats.std(),
        },
        "normalizer": normalizer.to_dict(),
        "leakage": leakage,
        # hsissl convert's per-scene records (resampling method, assumptions), where present
        "conversion": conversion,
        "config": config,
    }


def to_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1).encode()


def read(storage: Storage) -> dict[str, Any]:
    """The manifest of the dataset at ``storage``; FileNotFoundError when there is none,
    ValueError when it is of another format."""
    if not storage.exists(MANIFEST):
        raise FileNotFoundError(f"{storage.join(MANIFEST)}: no manifest; not a committed dataset "
                                "(run `hsissl ingest` first)")  # fmt: skip
    manifest: dict[str, Any] = json.loads(storage.get_bytes(MANIFEST))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{storage.join(MANIFEST)}: format {manifest.get('format')!r}, "
                         f"expected {FORMAT!r}")  # fmt: skip
    return manifest


def committed(storage: Storage, prefix: str) -> dict[str, Any] | None:
    """The manifest committed at ``prefix`` of ``storage``, or None when there is none."""
    key = f"{prefix}/{MANIFEST}"
    return json.loads(storage.get_bytes(key)) if storage.exists(key) else None
