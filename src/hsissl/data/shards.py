"""Tile shards: uncompressed, memory-mappable ``.npy`` arrays plus one manifest.

Per split, shard ``k`` is three files:
``<split>/images-k.npy`` (N, C, T, T) int16, ``<split>/labels-k.npy`` (N, T, T) uint8 and
``<split>/sources-k.npy`` (N, 3) int32 = (scene index, y, x) of every tile. The manifest
(:mod:`hsissl.data.manifest`, written last: the commit marker) lists them with sha256 checksums.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hsissl.data.manifest import MANIFEST, file_entry, shard_entry
from hsissl.data.manifest import read as read_manifest
from hsissl.data.normalize import Normalizer
from hsissl.storage import Storage, Transaction, open_storage

NPY_HEADER_BYTES = 128  # fixed, so the tile count can be patched in when a shard closes


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header padded to :data:`NPY_HEADER_BYTES`."""
    body = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(shape)})  # fmt: skip
    room = NPY_HEADER_BYTES - 10  # magic (6) + version (2) + header length (2)
    if len(body) + 1 > room:
        raise ValueError(f"npy header for shape {shape} does not fit in {NPY_HEADER_BYTES} bytes")
    return (
        b"\x93NUMPY\x01\x00" + room.to_bytes(2, "little") + (body.ljust(room - 1) + "\n").encode()
    )


def write_npy(path: Path, array: np.ndarray) -> tuple[str, int]:
    """Write an array as .npy in one go: (sha256, size)."""
    array = np.ascontiguousarray(array)
    head = npy_header(array.dtype, array.shape)
    body = memoryview(array).cast("B")
    with open(path, "wb") as f:
        f.write(head)
        f.write(body)
    return hashlib.sha256(head + body).hexdigest(), len(head) + body.nbytes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class _NpyStream:
    """An .npy file whose leading dimension grows as rows are appended."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), row_shape, 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.file.write(npy_header(self.dtype, (0, *row_shape)))

    def append(self, rows: np.ndarray) -> None:
        self.file.write(memoryview(np.ascontiguousarray(rows, dtype=self.dtype)).cast("B"))
        self.rows += len(rows)

    def finish(self) -> tuple[str, int]:
        self.file.seek(0)
        self.file.write(npy_header(self.dtype, (self.rows, *self.row_shape)))
        self.file.close()
        return sha256_file(self.path), self.path.stat().st_size


class ShardWriter:
    """Streams the tiles of one split into shard files on a background thread.

    Tiles go from the scene's array straight to the file (no shard-sized buffer, whose
    page faults would cost more than the copy); checksums are taken when a shard closes.
    """

    def __init__(self, tx: Transaction, split: str, shard_tiles: int, bands: int, tile: int,
                 pool: ThreadPoolExecutor):  # fmt: skip
        self.tx, self.split, self.pool = tx, split, pool
        self.shard_tiles, self.bands, self.tile = shard_tiles, bands, tile
        self.shards: list[dict[str, Any]] = []
        self._pending: list[Future] = []
        self._open: dict[str, _NpyStream] | None = None
        self._fill = 0

    def add(self, images: np.ndarray, labels: np.ndarray, sources: np.ndarray) -> None:
        """Queue (N, C, T, T) int16 tiles, (N, T, T) uint8 labels, (N, 3) int32 sources."""
        start = 0
        while start < len(images):
            take = min(len(images) - start, self.shard_tiles - self._fill)
            part = (
                images[start : start + take],
                labels[start : start + take],
                sources[start : start + take],
            )
            self._submit(self._append, *part)
            self._fill += take
            start += take
            if self._fill == self.shard_tiles:
                self._submit(self._finish)
                self._fill = 0

    def _submit(self, fn, *args) -> None:
        self._pending.append(self.pool.submit(fn, *args))
        while len(self._pending) > 4:  # bounded queue: at most a few scenes in flight
            self._pending.pop(0).result()

    def _append(self, images: np.ndarray, labels: np.ndarray, sources: np.ndarray) -> None:
        if self._open is None:
            index = len(self.shards)
            shapes = {"images": (np.int16, (self.bands, self.tile, self.tile)),
                      "labels": (np.uint8, (self.tile, self.tile)), "sources": (np.int32, (3,))}  # fmt: skip
            self._open = {kind: _NpyStream(self.tx.path(f"{self.split}/{kind}-{index:05d}.npy"), dt, shape)
                          for kind, (dt, shape) in shapes.items()}  # fmt: skip
        for kind, rows in (("images", images), ("labels", labels), ("sources", sources)):
            self._open[kind].append(rows)

    def _finish(self) -> None:
        if self._open is None:
            return
        files: dict[str, dict[str, Any]] = {}
        for kind, stream in self._open.items():
            sha, size = stream.finish()
            key = f"{self.split}/{stream.path.name}"
            self.tx.done(key)
            files[kind] = file_entry(key, sha, size)
        self.shards.append(shard_entry(self._open["images"].rows, files))
        self._open = None

    def close(self) -> list[dict[str, Any]]:
        if self._fill:
            self._submit(self._finish)
            self._fill = 0
        for future in self._pending:
            future.result()
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
        self.manifest: dict[str, Any] = read_manifest(self.storage)
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
