"""Pretraining throughput: images/s, MFU and peak memory per method, and loader tiles/s.

    PYTHONPATH=src python scripts/bench_train.py [--methods mae dinov2 ssvit] [--size base]
        [--batch 512 dinov2=256] [--fit-batch] [--steps N] [--warmup N] [--quick]
        [--compile/--no-compile] [--compile-scope networks|blocks] [--json OUT] [--data DIR]
        [--profile DIR]

On CUDA: the base (ViT-B/8) models at the ``configs/fast.yaml`` settings (no dropout), bf16,
batch 512, torch.compile. On the CPU: the tiny variants (the numbers then only show that the
benchmark runs). Data: random int16 tiles
written as shards with ``hsissl.data.shards`` plus a manifest into a local store, read back
through the trainer's own loader. No ingest and no MLflow, so it runs without rasterio,
minio, mlflow or segmentation-models-pytorch (the lent GPU machines have none of them).

Per method: one eager step under ``FlopCounterMode`` (FLOP per image; with ``--fit-batch`` the
batch shrinks until that step fits in memory), compile + warm-up (if compiling fails, the
method is rerun eager and says so), timed steps on one resident batch (model img/s, MFU),
timed steps fed by the loader (end-to-end img/s), then the loader alone up to normalised
tiles on the device (tiles/s). With ``--profile DIR``, 3 more steps under ``torch.profiler``:
the top kernels, how busy the GPU was and the share of matrix products (bench_profile.py).
Results go to stdout and, after every method, to ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from hsissl.config import load_config
from hsissl.data import ohs
from hsissl.data.normalize import Normalizer
from hsissl.data.shards import FORMAT, MANIFEST, ShardWriter
from hsissl.pretrain.recipe import COMPILE_SCOPES
from hsissl.pretrain.trainer import Trainer
from hsissl.storage import open_storage

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_profile.py
from bench_profile import profile_steps  # noqa: E402

RECIPES = {"mae": "hsissl.pretrain.mae:MAERecipe", "dinov2": "hsissl.pretrain.dinov2:DINOv2Recipe",
           "ssvit": "hsissl.pretrain.ssvit:SSViTRecipe"}  # fmt: skip
MODELS = {"mae": "mae_vit_{}_patch8_64", "dinov2": "dinov2_vit_{}_patch8_64",
          "ssvit": "ssvit_{}_patch8_64"}  # fmt: skip
# Dense bf16 peak of the card (vendor figure), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
DATASET = "bench"  # <run_dir>/artifacts/datasets/bench
PRESET = Path(__file__).resolve().parents[1] / "configs" / "fast.yaml"


# -- environment ------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                     model)  # fmt: skip
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def peak_flops(device: torch.device, override_tflops: float) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was measured): CUDA max allocated since the last reset, else the process's
    max resident set size (Linux reports it in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- data -------------------------------------------------------------------------------------
def write_dataset(run_dir: Path, tiles: int, tile: int = 64, shard_tiles: int = 1024) -> str:
    """A 'tr' split of ``tiles`` random int16 tiles at ``<run_dir>/artifacts/datasets/bench``
    (where the trainer looks for ``data.name=bench``), reused if it holds as many; its URI."""
    store = open_storage(run_dir / "artifacts")
    key = f"datasets/{DATASET}"
    if store.exists(f"{key}/{MANIFEST}"):
        manifest = json.loads(store.get_bytes(f"{key}/{MANIFEST}"))
        if manifest["splits"]["tr"]["tiles"] == tiles and manifest["tile_size"] == tile:
            return store.join(key)
    rng = np.random.default_rng(0)
    bands = ohs.NUM_BANDS
    pool = rng.integers(0, 10_000, size=(256, bands, tile, tile), dtype=np.int16)
    labels = rng.integers(0, ohs.NUM_CLASSES + 1, size=(256, tile, tile), dtype=np.uint8)
    with store.transaction(key) as tx, ThreadPoolExecutor(1) as writer_pool:
        writer = ShardWriter(tx, "tr", shard_tiles, bands, tile, writer_pool)
        for start in range(0, tiles, len(pool)):  # cycle the random pool: content is irrelevant
            n = min(len(pool), tiles - start)
            sources = np.stack([np.zeros(n), np.arange(start, start + n), np.zeros(n)], 1)
            writer.add(pool[:n], labels[:n], sources.astype(np.int32))
        norm = Normalizer((5000.0,) * bands, (2900.0,) * bands)  # ~ mean/std of U[0, 10000)
        manifest = {"format": FORMAT, "bands": bands, "tile_size": tile, "normalizer": norm.to_dict(),
                    "splits": {"tr": {"tiles": tiles, "scenes": ["random"], "shards": writer.close()}}}  # fmt: skip
        tx.commit({MANIFEST: json.dumps(manifest).encode()})
    return store.join(key)


def endless(loader: Any) -> Iterator:
    while True:
        yield from loader


# -- one method -------------------------------------------------------------------------------
def recipe_class(method: str) -> type:
    module, name = RECIPES[method].split(":")
    return getattr(importlib.import_module(module), name)


def make_trainer(method: str, batch: int, args: argparse.Namespace) -> Trainer:
    overrides = [f"run_dir={args.data}", f"data.name={DATASET}", "tracking.uri=",
                 f"{method}.model={MODELS[method].format(args.size)}", f"pretrain.batch_size={batch}",
                 "pretrain.knn_tiles=0", f"pretrain.loader_threads={args.threads}",
                 "pretrain.max_steps=1000000"]  # fmt: skip
    if method != "mae" and args.size == "tiny":  # CPU-sized DINO heads for the tiny check
        overrides += [f"{method}.out_dim=256", f"{method}.head_hidden=64",
                      f"{method}.head_bottleneck=32", f"{method}.n_local_crops=2"]  # fmt: skip
    # The throughput-tuned preset (no dropout, scaled lrs); the bench compiles on its own terms.
    cfg = load_config(PRESET, [*overrides, "pretrain.compile=false"])
    return Trainer(cfg, recipe_class(method), stage=f"bench-{method}")


def batch_candidates(batch: int, fit: bool) -> list[int]:
    """``batch``, then (with ``fit``) 3/4, 1/2, 3/8, 1/4 ... of it, down to 8."""
    if not fit:
        return [batch]
    sizes, b = [batch], batch
    while b > 8:
        sizes += [b * 3 // 4, b // 2]
        b //= 2
    return sorted({s for s in sizes if s >= min(8, batch)}, reverse=True)


def fitted_trainer(method: str, args: argparse.Namespace) -> tuple[Trainer, float]:
    """The trainer at the largest batch whose eager step fits, and FLOP per image (fwd + bwd of
    the whole step, teacher included) counted on that step."""
    wanted = args.batch.get(method, args.batch["*"])
    for batch in batch_candidates(wanted, args.fit_batch):
        trainer = make_trainer(method, batch, args)
        device = trainer.rt.device
        x = torch.randn(batch, ohs.NUM_BANDS, 64, 64, device=device)
        try:
            with FlopCounterMode(display=False) as counter:
                trainer.train_step(trainer.recipe, x, 1e-4)
            sync(device)
            return trainer, counter.get_total_flops() / batch
        except torch.cuda.OutOfMemoryError:
            print(f"{method}: batch {batch} does not fit in memory; trying a smaller one")
        del trainer, x  # outside the except block: the traceback no longer pins the tensors
        free_memory(device)
    raise RuntimeError(
        f"{method}: not even the smallest batch tried fits in memory "
        f"({batch_candidates(wanted, args.fit_batch)})"
    )


def timed_steps(trainer: Trainer, batches: Callable[[], torch.Tensor], steps: int) -> float:
    """Images per second over ``steps`` training steps on ``batches()``."""
    device = trainer.rt.device
    sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        x = batches()
        trainer.train_step(trainer.recipe, x, 1e-4)
        seen += len(x)
    sync(device)
    return seen / (time.perf_counter() - start)


def host_syncs_per_step(trainer: Trainer, x: torch.Tensor) -> int | None:
    """CUDA synchronisations in one step, counted by torch's sync debug mode (CUDA only)."""
    if trainer.rt.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(trainer.recipe, x, 1e-4)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def loader_rate(trainer: Trainer, batches: int) -> float:
    """Tiles per second of the training input path: shard gather, pinned host batch, copy to the
    device, normalisation (waits for the device at the end)."""
    stream = endless(trainer.loader)
    device = trainer.rt.device
    trainer.normalizer(next(stream)[0].to(device))  # threads started, normaliser cached
    sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        images, _ = next(stream)
        trainer.normalizer(images.to(device, non_blocking=True))
        seen += len(images)
    sync(device)
    return seen / (time.perf_counter() - start)


def profile_or_error(trainer: Trainer, x: torch.Tensor, method: str,
                     args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """3 profiled steps (bench_profile.py); a profiler failure is recorded, never fatal: the
    figures measured before it are what the GPU run is for."""
    device = trainer.rt.device
    title = f"{method} batch {len(x)} on {device_name(device)}"
    try:
        return profile_steps(lambda: trainer.train_step(trainer.recipe, x, 1e-4), 3, device,
                             args.profile / f"profile-{method}.txt", title)  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        return {"profile_error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def compile_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()),
            "graphs": int(counters["stats"]["unique_graphs"])}  # fmt: skip


def bench_method(method: str, args: argparse.Namespace, compile_: bool) -> dict[str, Any]:
    torch._dynamo.reset()  # fresh caches and counters per method
    trainer, flops_per_image = fitted_trainer(method, args)
    device, batch = trainer.rt.device, trainer.loader.batch_size
    x = torch.randn(batch, ohs.NUM_BANDS, 64, 64, device=device)
    options = {"mode": args.compile_mode, "backend": args.compile_backend}
    if compile_:
        trainer.recipe.compile_modules(args.compile_scope, **options)
    start = time.perf_counter()
    for _ in range(args.warmup):  # compiles (if compiling) and warms the allocator
        trainer.train_step(trainer.recipe, x, 1e-4)
    sync(device)
    warmup_s = time.perf_counter() - start
    reset_peak_memory(device)
    model_rate = timed_steps(trainer, lambda: x, args.steps)
    syncs = host_syncs_per_step(trainer, x)
    profiled = profile_or_error(trainer, x, method, args) if args.profile else {}
    stream = endless(trainer.loader)
    to_device = lambda: trainer.normalizer(next(stream)[0].to(device, non_blocking=True))  # noqa: E731
    e2e_rate = timed_steps(trainer, to_device, args.steps)
    mem_gib, mem_kind = peak_memory(device)
    loader = loader_rate(trainer, args.loader_batches)
    peak = peak_flops(device, args.peak_tflops)
    row = {
        "method": method, "model": getattr(trainer.cfg, method).model, "batch": batch,
        "compiled": compile_, "compile_scope": args.compile_scope if compile_ else None,
        "warmup_s": warmup_s, "gflop_per_image_fwd_bwd": flops_per_image / 1e9,
        "model_img_per_s": model_rate, "end_to_end_img_per_s": e2e_rate,
        "mfu": flops_per_image * model_rate / peak if peak else None,
        "mfu_end_to_end": flops_per_image * e2e_rate / peak if peak else None,
        "peak_mem_gib": mem_gib, "peak_mem_kind": mem_kind, "loader_tiles_per_s": loader,
        "loader_over_training": loader / model_rate, "host_syncs_per_step": syncs,
        **(compile_counters() if compile_ else {}), **profiled,
    }  # fmt: skip
    return row  # the trainer goes with this frame; the caller frees the memory


def bench_or_fallback(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Compiled if asked; if compiling fails, the same method eager, with the error recorded."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return bench_method(method, args, compile_=args.compile)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: measure eager instead
        if not args.compile:
            raise
        traceback.print_exc()
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        free_memory(device)
    print(f"{method}: torch.compile failed ({error}); FALLING BACK TO EAGER", flush=True)
    torch._dynamo.reset()
    try:
        return bench_method(method, args, compile_=False) | {"compile_error": error}
    finally:
        free_memory(device)


def format_row(row: dict[str, Any]) -> str:
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
    syncs = row["host_syncs_per_step"]
    mode = f"compiled ({row['compile_scope']})" if row["compiled"] else "eager"
    return (f"{row['method']:7s} {row['model']:26s} batch {row['batch']:4d} {mode:20s} | "
            f"model {row['model_img_per_s']:9.0f} img/s | end-to-end {row['end_to_end_img_per_s']:9.0f} img/s | "
            f"{row['gflop_per_image_fwd_bwd']:.2f} GFLOP/img | MFU {mfu} | "
            f"peak memory {row['peak_mem_gib']:.2f} GiB ({row['peak_mem_kind']}) | "
            f"loader {row['loader_tiles_per_s']:.0f} tiles/s ({row['loader_over_training']:.2f}x training) | "
            f"warm-up {row['warmup_s']:.1f} s | host syncs/step {'n/a' if syncs is None else syncs}"
            + (f" | graph breaks {row['graph_breaks']}" if "graph_breaks" in row else "")
            + (f" | GPU busy {row['gpu_busy']:.0%}, matmul {row['gemm_share']:.0%} of GPU time"
               if row.get("gpu_busy") is not None and row.get("gemm_share") is not None else ""))  # fmt: skip


# -- command line -----------------------------------------------------------------------------
def parse_batches(items: list[str]) -> dict[str, int]:
    """``["512", "dinov2=256"]`` -> {"*": 512, "dinov2": 256}."""
    out: dict[str, int] = {}
    for item in items:
        method, _, value = item.rpartition("=")
        if method and method not in RECIPES:
            raise SystemExit(f"--batch {item}: unknown method {method!r}; expected {list(RECIPES)}")
        if not value.isdigit() or int(value) < 2:
            raise SystemExit(f"--batch {item}: expected N or METHOD=N with N >= 2")
        out[method or "*"] = int(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    add("--size", choices=["base", "tiny"], help="model size; default base on CUDA, tiny on CPU")
    add("--batch", nargs="+", default=[], metavar="N|METHOD=N",
        help="batch per step, for all methods and/or per method; default 512 on CUDA, 8 on CPU")  # fmt: skip
    add("--fit-batch", action="store_true",
        help="shrink a batch (3/4, 1/2, ...) until one eager step fits in GPU memory")  # fmt: skip
    add(
        "--steps", type=int, default=0, help="timed steps; default 20 on CUDA (8 --quick), 3 on CPU"
    )
    add("--warmup", type=int, default=0, help="untimed steps (compilation); default 3 (2 --quick)")
    add("--loader-batches", type=int, default=0, help="batches timed for the loader alone")
    add("--quick", action="store_true", help="fewer steps and tiles: all methods in a few minutes")
    add("--threads", type=int, default=8, help="loader threads")
    add("--tiles", type=int, default=0, help="tiles in the generated dataset (default from batch)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the networks (default: on CUDA)")  # fmt: skip
    add("--compile-scope", choices=COMPILE_SCOPES, default="networks",
        help="networks: each backbone/head one full graph (as the trainer); blocks: each "
             "transformer block (regional: much shorter compile)")  # fmt: skip
    add("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    add(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (aot_eager: no codegen)",
    )
    add("--profile", type=Path, metavar="DIR",
        help="profile 3 steps per method: top kernels to DIR/profile-<method>.txt, GPU busy "
             "fraction and matmul share into the results")  # fmt: skip
    add("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for MFU (default: by name)")
    add("--data", type=Path, help="folder for the generated shards (reused); default a temp dir")
    add("--json", "--out", dest="json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.size = args.size or ("base" if cuda else "tiny")
    args.batch = {"*": 512 if cuda else 8} | parse_batches(args.batch)
    args.steps = args.steps or (3 if not cuda else 8 if args.quick else 20)
    args.warmup = args.warmup or (1 if not cuda else 2 if args.quick else 3)
    args.loader_batches = args.loader_batches or (3 if not cuda else 10 if args.quick else 20)
    most = max(args.batch.values())
    args.tiles = args.tiles or max(most * (8 if args.quick or not cuda else 16), 64)
    args.compile = cuda if args.compile is None else args.compile
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; python {platform.python_version()}; "
          f"size {args.size}; compile {args.compile} ({args.compile_scope}); batch {args.batch}; "
          f"steps {args.steps} (+{args.warmup} warm-up)", flush=True)  # fmt: skip
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "rows": [], "failed": {},
                              "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hsissl-bench-") as tmp:
        args.data = (args.data or Path(tmp)).resolve()
        start = time.perf_counter()
        write_dataset(args.data, args.tiles)
        print(f"data: {args.tiles} random tiles as shards in {args.data} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip
        for method in args.methods:
            try:
                row = bench_or_fallback(method, args)
            except Exception as exc:  # noqa: BLE001 - report it, go on with the next method
                traceback.print_exc()
                result["failed"][method] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"{method}: FAILED ({result['failed'][method]})", flush=True)
                continue
            result["rows"].append(row)
            print(format_row(row), flush=True)
            if args.json:  # after every method: a later crash or timeout keeps these
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
