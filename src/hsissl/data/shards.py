"""Tile shards: uncompressed, memory-mappable ``.npy`` arrays plus one manifest.

Per split, shard ``k`` is three files:
``<split>/images-k.npy`` (N, C, T, T) int16, ``<split>/labels-k.npy`` (N, T, T) uint8 and
``<split>/sources-k.npy`` (N, 3) int32 = (scene index, y, x) of every tile. The manifest
(written last, it is the commit marker) lists them with sha256 checksums.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hsissl.data.normalize import Normalizer
from hsissl.storage import Storage, Transaction, open_storage

FORMAT = "hsissl-shards/1"
MANIFEST = "manifest.json"


def write_npy(path: Path, array: np.ndarray) -> tuple[str, int]:
    """Write a C-contiguous array as .npy, hashing the bytes as they go out: (sha256, size)."""
    array = np.ascontiguousarray(array)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(array))
    digest = hashlib.sha256(head.getvalue())
    body = memoryview(array).cast("B")
    digest.update(body)
    with open(path, "wb") as f:
        f.write(head.getvalue())
        f.write(body)
    return digest.hexdigest(), len(head.getvalue()) + body.nbytes


class ShardWriter:
    """Buffers tiles of one split and writes full shards on a background thread."""

    def __init__(self, tx: Transaction, split: str, shard_tiles: int, bands: int, tile: int,
                 pool: ThreadPoolExecutor):  # fmt: skip
        self.tx, self.split, self.pool = tx, split, pool
        self.shape = (shard_tiles, bands, tile, tile)
        self.shards: list[dict[str, Any]] = []
        self._pending: list[Future] = []
        self._new_buffer()

    def _new_buffer(self) -> None:
        n = self.shape[0]
        self._img = np.empty(self.shape, dtype=np.int16)  # (S, C, T, T)
        self._lbl = np.empty((n, *self.shape[2:]), dtype=np.uint8)  # (S, T, T)
        self._src = np.empty((n, 3), dtype=np.int32)
        self._fill = 0

    def add(self, images: np.ndarray, labels: np.ndarray, sources: np.ndarray) -> None:
        start = 0
        while start < len(images):
            take = min(len(images) - start, self.shape[0] - self._fill)
            end, fill = start + take, self._fill
            self._img[fill : fill + take] = images[start:end]
            self._lbl[fill : fill + take] = labels[start:end]
            self._src[fill : fill + take] = sources[start:end]
            self._fill += take
            start = end
            if self._fill == self.shape[0]:
                self._flush()

    def _flush(self) -> None:
        if self._fill == 0:
            return
        index = len(self.shards) + len(self._pending)
        n = self._fill
        job = (index, self._img[:n], self._lbl[:n], self._src[:n])
        self._pending.append(self.pool.submit(self._write, *job))
        if len(self._pending) > 1:  # at most two buffers in memory
            self.shards.append(self._pending.pop(0).result())
        self._new_buffer()

    def _write(
        self, index: int, img: np.ndarray, lbl: np.ndarray, src: np.ndarray
    ) -> dict[str, Any]:
        record: dict[str, Any] = {"count": len(img), "files": {}}
        for kind, arr in (("images", img), ("labels", lbl), ("sources", src)):
            key = f"{self.split}/{kind}-{index:05d}.npy"
            sha, size = write_npy(self.tx.path(key), arr)
            self.tx.done(key)
            record["files"][kind] = {"key": key, "sha256": sha, "bytes": size}
        return record

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        self.shards.extend(f.result() for f in self._pending)
        self._pending.clear()
        return self.shards


@dataclass
class SplitView:
    """Random access to the tiles of one split across its memory-mapped shards."""

    name: str
    images: list[np.ndarray]  # per shard (n_k, C, T, T) int16 memmap
    labels: list[np.ndarray]  # per shard (n_k, T, T) uint8 memmap
    sources: np.ndarray  # (N, 3) int32: scene index, y, x
    scenes: list[str]

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [len(a) for a in self.images])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, indices: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Tiles at global ``indices``: ((B, C, T, T) int16, (B, T, T) uint8), in the order given."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"tile index out of range 0..{len(self) - 1} in split {self.name!r}")
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        img = np.empty((len(idx), *self.images[0].shape[1:]), dtype=np.int16)
        lbl = np.empty((len(idx), *self.labels[0].shape[1:]), dtype=np.uint8)
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            local = idx[sel] - self.offsets[k]
            order = np.argsort(local, kind="stable")  # sequential reads within a shard
            img[sel[order]] = self.images[k][local[order]]
            lbl[sel[order]] = self.labels[k][local[order]]
        return img, lbl


class ShardDataset:
    """A committed dataset: manifest + memory-mapped shards, local or on S3."""

    def __init__(self, uri: str, cache_dir: Path | None = None, verify: bool = False):
        self.uri = uri
        self.storage: Storage = open_storage(uri)
        if not self.storage.exists(MANIFEST):
            raise FileNotFoundError(f"{self.storage.join(MANIFEST)}: no manifest; not a committed dataset "
                                    "(run `hsissl ingest` first)")  # fmt: skip
        self.manifest: dict[str, Any] = json.loads(self.storage.get_bytes(MANIFEST))
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.storage.join(MANIFEST)}: format {self.manifest.get('format')!r}, "
                             f"expected {FORMAT!r}")  # fmt: skip
        self.normalizer = Normalizer.from_dict(
            self.manifest["normalizer"], origin=self.storage.join(MANIFEST)
        )
        self._cache_dir, self._verify = cache_dir, verify
        self._splits: dict[str, SplitView] = {}

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> SplitView:
        if name not in self.manifest["splits"]:
            raise KeyError(f"{self.uri}: no split {name!r}; it has {self.splits}")
        if name not in self._splits:
            info = self.manifest["splits"][name]
            images, labels, sources = [], [], []
            for shard in info["shards"]:
                files = {k: self._open(v) for k, v in shard["files"].items()}
                images.append(files["images"])
                labels.append(files["labels"])
                sources.append(np.asarray(files["sources"]))
            src = np.concatenate(sources) if sources else np.zeros((0, 3), np.int32)
            self._splits[name] = SplitView(name, images, labels, src, info["scenes"])
        return self._splits[name]

    def _open(self, entry: dict[str, Any]) -> np.ndarray:
        path = self.storage.open_local(entry["key"], cache_dir=self._cache_dir)
        if self._verify:
            verify_file(path, entry["sha256"])
        return np.load(path, mmap_mode="r")


def verify_file(path: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise ValueError(
            f"{path}: sha256 {digest.hexdigest()} does not match the manifest's {sha256}"
        )
