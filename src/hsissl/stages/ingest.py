"""Stage 1: validate scenes, tile, shard into the artifact store, compute band statistics.

Reads every scene once. Header checks run on all files before anything is written;
content checks run as pixels are read, and any violation aborts the storage
transaction, so a failed ingest leaves nothing behind and the dataset committed before stays
current (hsissl.storage.commit); a second ingest of the same name fails at once. Re-running with the same input
files and data config reuses the committed dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from hsissl.config import Config, to_yaml
from hsissl.data import leakage, ohs
from hsissl.data import manifest as manifest_file
from hsissl.data.convert import read_records
from hsissl.data.manifest import FORMAT, MANIFEST
from hsissl.data.normalize import Normalizer
from hsissl.data.s3_scenes import ObjectRoot, discover_s3, reading
from hsissl.data.scenes import (
    DataContractError,
    SceneHeader,
    Violation,
    check_header,
    discover,
    file_identity,
    file_size,
    read_scene,
)
from hsissl.data.shards import ShardWriter
from hsissl.data.stats import BandStats, band_sums
from hsissl.data.tiling import cut_tiles, tile_positions
from hsissl.layout import dataset_key, dataset_uri, storage_of
from hsissl.stages.common import prepare_source
from hsissl.stages.results import IngestCheck, IngestResult
from hsissl.storage import Lease
from hsissl.tracking import stage_run

log = logging.getLogger(__name__)


def run(cfg: Config, report: bool = False) -> IngestResult | IngestCheck:
    """Ingest ``cfg.data.source`` (or the generated dataset); returns dataset URI and manifest.

    With ``report=True`` every file is checked, all violations are returned, nothing is written.
    """
    root, data_cfg = prepare_source(cfg)
    with reading(root):  # an s3:// source is read in place, scene by scene
        return _ingest(cfg, root, data_cfg, report)


def _ingest(cfg: Config, root: Path | ObjectRoot, data_cfg: Any,
            report: bool) -> IngestResult | IngestCheck:  # fmt: skip
    headers, violations = validate_headers(
        root, data_cfg.splits, data_cfg.scene_size, data_cfg.tile_size
    )
    allow = data_cfg.allow_split_overlap
    leaks = leakage.name_overlaps(headers) + leakage.footprint_overlaps(headers)
    if report:
        content, index = validate_content(headers, data_cfg.tile_size, data_cfg.stride)
        leaks += index.overlaps()
        found = violations + content + ([] if allow else [o.violation() for o in leaks])
        return IngestCheck(found, str(root), leakage.summary(leaks, allow, index.constant))
    if violations:
        raise DataContractError(violations)
    if leaks and not allow:  # before any pixel is read
        raise DataContractError([o.violation() for o in leaks])

    storage = storage_of(cfg)
    prefix = dataset_key(data_cfg.name)
    fingerprint = input_fingerprint(headers, data_cfg)
    existing = manifest_file.committed(storage, prefix)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        log.info(
            "dataset %s is up to date (fingerprint %s); reusing it",
            storage.join(prefix),
            fingerprint,
        )
        return IngestResult(storage.join(prefix), existing, reused=True)

    # The lease first: a second ingest of this name fails before it opens an MLflow run.
    with Lease(storage, prefix) as lease, stage_run(cfg, "ingest") as tracker:
        start = time.perf_counter()
        with storage.transaction(prefix, lease=lease) as tx:
            manifest = _write_shards(tx, headers, data_cfg, fingerprint, root, leaks)
            tx.commit(
                {"config.yaml": to_yaml(cfg).encode(), MANIFEST: manifest_file.to_bytes(manifest)}
            )
        seconds = time.perf_counter() - start
        source_mb = sum(file_size(h.pair.image) + file_size(h.pair.label)
                        for hs in headers.values() for h in hs) / 1e6  # fmt: skip
        tracker.log_metrics({f"tiles_{s}": v["tiles"] for s, v in manifest["splits"].items()}
                            | {"seconds": seconds, "source_mb_per_s": source_mb / max(seconds, 1e-9)})  # fmt: skip
        tracker.log_dict(manifest, "manifest.json")
        tracker.set_tags(
            {
                "dataset_uri": storage.join(prefix),
                "normalizer": manifest["normalizer"]["fingerprint"],
            }
        )
    log.info("committed %s (%.1f MB in %.1f s)", storage.join(prefix), source_mb, seconds)
    return IngestResult(dataset_uri(cfg), manifest, reused=False)


def validate_headers(root: Path | ObjectRoot, splits: list[str], scene_size: int | None,
                     tile: int) -> tuple[dict[str, list[SceneHeader]], list[Violation]]:  # fmt: skip
    """Headers of the scenes that pass the header checks per split, and all violations found."""
    found = discover_s3(root, splits) if isinstance(root, ObjectRoot) else discover(root, splits)
    pairs, violations = found
    headers: dict[str, list[SceneHeader]] = {}
    for split, found in pairs.items():
        headers[split] = []
        for pair in found:
            header, bad = check_header(pair, scene_size, tile)
            violations += bad
            if header is not None:
                headers[split].append(header)
    return headers, violations


def validate_content(headers: dict[str, list[SceneHeader]], tile: int,
                     stride: int) -> tuple[list[Violation], leakage.TileIndex]:  # fmt: skip
    """Content violations of every scene, and the tile digests of the readable ones."""
    violations: list[Violation] = []
    index = leakage.TileIndex()
    for split, split_headers in headers.items():
        for header in tqdm(split_headers, desc="validate", unit="scene", leave=False):
            image, _, bad = read_scene(header)
            violations += bad
            if image is not None:
                positions = tile_positions(header.height, header.width, tile, stride)
                index.add(split, str(header.pair.image), positions,
                          leakage.tile_digests(cut_tiles(image, positions, tile)))  # fmt: skip
    return violations, index


def input_fingerprint(headers: dict[str, list[SceneHeader]], data_cfg: Any) -> str:
    """Identity of an ingest: input files (name, size, mtime) and every setting that shapes the output."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(data_cfg).items() if k not in ("readers",)}
    digest.update(json.dumps([FORMAT, settings], sort_keys=True).encode())
    for split in sorted(headers):
        for h in headers[split]:
            for file in (h.pair.image, h.pair.label):
                digest.update(file_identity(split, file).encode())
    return digest.hexdigest()[:16]


def _bounded_map(pool: ThreadPoolExecutor, fn, items: list, ahead: int) -> Iterator:
    """Like ``pool.map`` (ordered) but with at most ``ahead`` results in flight: bounded memory."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass
class _PreparedScene:
    images: np.ndarray | None  # (N, C, T, T) int16
    labels: np.ndarray | None  # (N, T, T) uint8
    positions: list[tuple[int, int]]
    class_pixels: np.ndarray | None  # (NUM_CLASSES + 1,)
    sums: tuple | None  # band_sums() of the kept tiles
    digests: list  # leakage.tile_digests() of the kept tiles
    source_bytes: int
    violations: list[Violation]


def _prepare_scene(header: SceneHeader, tile: int, stride: int, drop: bool) -> _PreparedScene:
    """Read, check, tile and summarise one scene (runs on a reader thread)."""
    image, label, bad = read_scene(header)
    size = file_size(header.pair.image)
    if bad:
        return _PreparedScene(None, None, [], None, None, [], size, bad)
    positions = tile_positions(header.height, header.width, tile, stride)
    img_tiles = cut_tiles(image, positions, tile)  # (N, C, T, T)
    lbl_tiles = cut_tiles(label, positions, tile)  # (N, T, T)
    if drop:
        keep = lbl_tiles.reshape(len(lbl_tiles), -1).any(axis=1)
        img_tiles, lbl_tiles = img_tiles[keep], lbl_tiles[keep]
        positions = [p for p, k in zip(positions, keep, strict=True) if k]
    counts = np.bincount(lbl_tiles.ravel(), minlength=ohs.NUM_CLASSES + 1)
    sums = band_sums(img_tiles) if len(img_tiles) else None
    digests = leakage.tile_digests(img_tiles)
    return _PreparedScene(img_tiles, lbl_tiles, positions, counts, sums, digests, size, [])


def _write_split(tx: Any, split: str, headers: list[SceneHeader], data_cfg: Any, stats: BandStats,
                 bar: tqdm, readers: ThreadPoolExecutor, writer_pool: ThreadPoolExecutor,
                 tiles_seen: leakage.TileIndex) -> dict[str, Any]:  # fmt: skip
    tile, n_readers = data_cfg.tile_size, max(1, data_cfg.readers)
    writer = ShardWriter(tx, split, data_cfg.shard_tiles, ohs.NUM_BANDS, tile, writer_pool)
    class_pixels = np.zeros(ohs.NUM_CLASSES + 1, dtype=np.int64)
    tiles = 0
    # Ordered, bounded read-ahead; reading, tiling and statistics run on `readers` threads.
    prepare = partial(
        _prepare_scene, tile=tile, stride=data_cfg.stride, drop=data_cfg.drop_unlabelled
    )
    for i, scene in enumerate(_bounded_map(readers, prepare, headers, ahead=2 * n_readers)):
        if scene.violations:
            raise DataContractError(scene.violations)
        sources = np.array([(i, y, x) for y, x in scene.positions], dtype=np.int32).reshape(-1, 3)
        writer.add(scene.images, scene.labels, sources)
        tiles_seen.add(split, str(headers[i].pair.image), scene.positions, scene.digests)
        class_pixels += scene.class_pixels
        if split == "tr" and scene.sums is not None:
            stats.merge(*scene.sums)
        tiles += len(scene.images)
        bar.update(scene.source_bytes)
    return manifest_file.split_entry(tiles, [h.pair.name for h in headers], class_pixels,
                                     writer.close())  # fmt: skip


def _write_shards(tx: Any, headers: dict[str, list[SceneHeader]], data_cfg: Any, fingerprint: str,
                  root: Path | ObjectRoot, leaks: list[leakage.Overlap]) -> dict[str, Any]:  # fmt: skip
    tile, stride = data_cfg.tile_size, data_cfg.stride
    stats = BandStats(ohs.NUM_BANDS)
    splits: dict[str, Any] = {}
    tiles_seen = leakage.TileIndex()
    total_bytes = sum(file_size(h.pair.image) for hs in headers.values() for h in hs)
    # The bar is closed (its line ended) before any error prints; a failure cancels the queued
    # reads and uploads instead of running them against a store that just failed.
    with (
        tqdm(total=total_bytes, unit="B", unit_scale=True, desc="ingest") as bar,
        ThreadPoolExecutor(max(1, data_cfg.readers)) as readers,
        ThreadPoolExecutor(1) as writer_pool,
    ):
        try:
            for split in data_cfg.splits:
                splits[split] = _write_split(tx, split, headers[split], data_cfg, stats, bar,
                                             readers, writer_pool, tiles_seen)  # fmt: skip
        except BaseException:
            for pool in (writer_pool, readers):
                pool.shutdown(wait=False, cancel_futures=True)
            raise
    leaks = leaks + tiles_seen.overlaps()
    if leaks and not data_cfg.allow_split_overlap:  # the transaction is aborted: nothing written
        raise DataContractError([o.violation() for o in leaks])
    if stats.count == 0:
        raise DataContractError([Violation(str(root / "tr"), "training tiles", "none kept",
                                           "at least one tile for band statistics")])  # fmt: skip
    normalizer = Normalizer(tuple(stats.mean()), tuple(stats.std()))
    return manifest_file.new_manifest(
        fingerprint=fingerprint, source=str(root), tile_size=tile, stride=stride, splits=splits,
        stats=stats, normalizer=normalizer,
        leakage=leakage.summary(leaks, data_cfg.allow_split_overlap, tiles_seen.constant),
        # hsissl convert's records live beside a local folder's scenes (none for s3:// sources)
        conversion={s: r for s in data_cfg.splits
                    if isinstance(root, Path) and (r := read_records(root, s))},
        config=asdict(data_cfg),
    )  # fmt: skip
