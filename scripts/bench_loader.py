"""Random-tile throughput of TileBatches on a synthetic shard dataset.

Writes N tiles (32 x 64 x 64 int16, ~256 KiB each) as shards with the real ShardWriter and a
manifest, then times random batches with 1, 2, 4 ... reader threads (page cache warm: the files
were just written). With CUDA, also times the full path to normalised float32 on the GPU.

    .venv/bin/python scripts/bench_loader.py --tiles 8192 --batch 512 --threads 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from hsissl.data import ohs
from hsissl.data.loaders import TileBatches, device_normalize
from hsissl.data.manifest import FORMAT, MANIFEST
from hsissl.data.normalize import Normalizer
from hsissl.data.shards import ShardDataset, ShardWriter
from hsissl.storage import open_storage


def write_dataset(root: Path, tiles: int, tile: int, shard_tiles: int, seed: int = 0) -> str:
    """A one-split ('tr') dataset of ``tiles`` random tiles; returns its URI."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 10_000, size=(256, ohs.NUM_BANDS, tile, tile), dtype=np.int16)
    labels = rng.integers(0, ohs.NUM_CLASSES + 1, size=(256, tile, tile), dtype=np.uint8)
    storage = open_storage(root)
    with storage.transaction("bench") as tx, ThreadPoolExecutor(1) as writer_pool:
        writer = ShardWriter(tx, "tr", shard_tiles, ohs.NUM_BANDS, tile, writer_pool)
        for start in range(0, tiles, len(pool)):  # cycle the random pool: content is irrelevant
            n = min(len(pool), tiles - start)
            sources = np.stack([np.zeros(n), np.arange(start, start + n), np.zeros(n)], 1)
            writer.add(pool[:n], labels[:n], sources.astype(np.int32))
        norm = Normalizer((5000.0,) * ohs.NUM_BANDS, (2900.0,) * ohs.NUM_BANDS)
        manifest = {"format": FORMAT, "bands": ohs.NUM_BANDS, "tile_size": tile,
                    "normalizer": norm.to_dict(),
                    "splits": {"tr": {"tiles": tiles, "scenes": ["synthetic"],
                                      "shards": writer.close()}}}  # fmt: skip
        tx.commit({MANIFEST: json.dumps(manifest).encode()})
    return storage.join("bench")


def time_batches(loader: TileBatches, steps: int, device: str | None, norm: Normalizer) -> float:
    """Tiles per second over the next ``steps`` batches (epochs wrap)."""
    done, start = 0, time.perf_counter()
    while done < steps:
        for images, _ in loader:
            if device is not None:
                x = device_normalize(images, norm, device)
                torch.cuda.synchronize() if x.is_cuda else None
            done += 1
            if done == steps:
                break
    return steps * loader.batch_size / (time.perf_counter() - start)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--shard-tiles", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32, help="timed batches per setting")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cpu: {cpu_model()} | {affinity} usable cores (os.cpu_count {os.cpu_count()})")
    print(f"torch {torch.__version__} | numpy {np.__version__} | "
          f"device: {torch.cuda.get_device_name(0) if cuda else 'none (CPU only)'}")  # fmt: skip

    root = args.dir or Path(tempfile.mkdtemp(prefix="hsissl-bench-"))
    try:
        t0 = time.perf_counter()
        uri = write_dataset(root, args.tiles, args.tile, args.shard_tiles)
        size_gb = args.tiles * ohs.NUM_BANDS * args.tile**2 * 2 / 1e9
        print(f"wrote {args.tiles} tiles ({size_gb:.2f} GB) in {time.perf_counter() - t0:.1f} s "
              f"at {uri}")  # fmt: skip
        ds = ShardDataset(uri)
        split = ds.split("tr")
        print(
            f"batch {args.batch}, prefetch {args.prefetch}, pinned {cuda}, {args.steps} timed batches"
        )
        targets = [("host int16", None)] + ([("-> cuda float32", "cuda")] if cuda else [])
        for label, device in targets:
            for threads in args.threads:
                loader = TileBatches(split, args.batch, seed=0, workers=threads,
                                     prefetch=args.prefetch)  # fmt: skip
                # The first epoch also maps the shard pages into the process: report it apart.
                first = time_batches(loader, len(loader), device, ds.normalizer)
                rate = time_batches(loader, args.steps, device, ds.normalizer)
                print(f"  {label:16s} threads={threads:2d}: {rate:10,.0f} tiles/s "
                      f"({rate * ohs.NUM_BANDS * args.tile**2 * 2 / 1e9:.2f} GB/s; "
                      f"first epoch {first:,.0f} tiles/s)")  # fmt: skip
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
