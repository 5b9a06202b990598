"""Ingest throughput (MB/s of source GeoTIFF) next to raw rasterio reads of the same files.

    .venv/bin/python scripts/bench_ingest.py [--scenes 24] [--size 512] [--repeats 3]

Both are measured warm (files in the page cache), best of --repeats, on this machine.
Target: ingest >= 80 % of the raw read speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

from hsissl.config import load_config
from hsissl.data.geotiff import default_transform, write_image, write_label
from hsissl.stages import ingest


def make_scenes(root: Path, scenes: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    for i in range(scenes):
        split = "tr" if i < scenes - 2 else ("va" if i == scenes - 2 else "ts")
        name = f"B{i:04d}.tif"
        image = rng.integers(0, 10000, size=(32, size, size), dtype=np.int16)
        label = rng.integers(0, 25, size=(size, size), dtype=np.uint8)
        write_image(root / split / "image" / name, image, default_transform(i, size))
        write_label(root / split / "label" / name, label, default_transform(i, size))
    return sorted(root.rglob("*.tif"))


def evict(files: list[Path]) -> None:
    """Drop the files from the page cache (cold reads, as from a disk or network volume)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[Path], cold: bool) -> float:
    if cold:
        evict(files)
    start = time.perf_counter()
    for path in files:
        with rasterio.open(path) as src:
            src.read()
    return time.perf_counter() - start


def timed_ingest(tmp: Path, files: list[Path], size: int, name: str, cold: bool) -> float:
    cfg = load_config(None, [f"run_dir={tmp / 'run'}", f"data.source={tmp / 'whu'}",
                             f"data.scene_size={size}", f"data.name={name}"])  # fmt: skip
    if cold:
        evict(files)
    start = time.perf_counter()
    ingest.run(cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        tmp = Path(tmp)
        files = make_scenes(tmp / "whu", args.scenes, args.size)
        mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"source: {args.scenes} scenes of {args.size}x{args.size}x32 + labels, {mb:.0f} MB")
        timed_ingest(tmp, files, args.size, "warmup", cold=False)  # creates the MLflow store once
        for cold in (True, False):
            raw = min(raw_read(files, cold) for _ in range(args.repeats))
            runs = [
                timed_ingest(tmp, files, args.size, f"b{int(cold)}{r}", cold)
                for r in range(args.repeats)
            ]
            best = min(runs)
            label = "cold (page cache dropped)" if cold else "warm (files in page cache)"
            print(
                f"{label}: raw read {mb / raw:7.1f} MB/s, ingest {mb / best:7.1f} MB/s, "
                f"ratio {raw / best:.2f} (target >= 0.80)"
            )
    print("ingest = validation, tiling, band stats, class counts, shard writes with sha256,")
    print("manifest and MLflow run; best of", args.repeats)


if __name__ == "__main__":
    main()
