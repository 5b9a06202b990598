"""Pretraining throughput: images/s, MFU and peak memory per method, and loader tiles/s.

    PYTHONPATH=src python scripts/bench_train.py [--methods mae dinov2 ssvit] [--size base]
        [--batch 512 dinov2=256] [--fit-batch] [--steps N] [--warmup N] [--quick]
        [--compile/--no-compile] [--compile-scope networks|blocks] [--json OUT] [--data DIR]
        [--profile DIR] [--reference] [--checkpoint-blocks N ssvit=N] [--memory-cap GIB]
        [--fit-checkpoint] [--sdpa BACKEND]

On CUDA: the base (ViT-B/8) models at the ``configs/fast.yaml`` settings (no dropout), bf16,
batch 512, torch.compile. On the CPU: the tiny variants (the numbers then only show that the
benchmark runs). Data: random int16 tiles
written as shards with ``hsissl.data.shards`` plus a manifest into a local store, read back
through the trainer's own loader. No ingest and no MLflow, so it runs without rasterio,
minio, mlflow or segmentation-models-pytorch (the lent GPU machines have none of them).

First the card's dense bf16 matrix-product rate is measured (8192^3 products): MFU is against
that measured peak, not a datasheet figure. Per method: one eager step under
``FlopCounterMode`` (FLOP per image; with ``--fit-batch`` the batch shrinks, with
``--fit-checkpoint`` more blocks are recomputed, until that step fits in memory, capped by
``--memory-cap``), compile + warm-up (if compiling fails, the method is rerun eager and says
so), timed steps on one resident batch (model img/s, MFU), timed steps fed as the trainer feeds
them (``DeviceBatches``: gathered, copied and normalised a step ahead; end-to-end img/s), the
same fed serially as before that existed (the lever's effect), then the loader alone up to
normalised tiles on the device (tiles/s), and the hours a full WHU-OHS run would take at the
end-to-end rate. ``--reference`` adds a plain timm ViT-B/8 supervised step on the same input
(no project code), so every recipe can be read as a ratio to a well-tuned plain ViT. With ``--profile DIR``, 3 more steps under ``torch.profiler``:
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
import threading
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
from hsissl.data.loaders import endless
from hsissl.data.manifest import FORMAT, MANIFEST
from hsissl.data.normalize import Normalizer
from hsissl.data.prefetch import DeviceBatches
from hsissl.data.shards import ShardWriter
from hsissl.pretrain.recipe import COMPILE_SCOPES, set_checkpoint_blocks
from hsissl.pretrain.trainer import Trainer
from hsissl.storage import open_storage

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_profile.py
from bench_profile import profile_steps  # noqa: E402

RECIPES = {"mae": "hsissl.pretrain.mae:MAERecipe", "dinov2": "hsissl.pretrain.dinov2:DINOv2Recipe",
           "ssvit": "hsissl.pretrain.ssvit:SSViTRecipe"}  # fmt: skip
MODELS = {"mae": "mae_vit_{}_patch8_64", "dinov2": "dinov2_vit_{}_patch8_64",
          "ssvit": "ssvit_{}_patch8_64"}  # fmt: skip
# Dense bf16 peak of the card (vendor figure): printed beside the measured one, which MFU uses.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
WHU_OHS_TRAIN_TILES = 308_000  # 64x64 tiles of the WHU-OHS training scenes (issue #19)
SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")
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


def vendor_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def measured_matmul_peak(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """FLOP/s of an n^3 bf16 matrix product on random data (mean of ``reps`` after 3 warm-ups):
    what this card really gives the dense layers, the MFU denominator. None on the CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


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


# -- one method -------------------------------------------------------------------------------
def recipe_class(method: str) -> type:
    module, name = RECIPES[method].split(":")
    return getattr(importlib.import_module(module), name)


def make_trainer(method: str, batch: int, args: argparse.Namespace) -> Trainer:
    overrides = [f"run_dir={args.data}", f"data.name={DATASET}", "tracking.uri=",
                 f"{method}.model={MODELS[method].format(args.size)}", f"pretrain.batch_size={batch}",
                 "pretrain.knn_tiles=0", f"pretrain.loader_threads={args.threads}",
                 "pretrain.max_steps=1000000",
                 f"pretrain.checkpoint_blocks={args.checkpoint_blocks.get(method, args.checkpoint_blocks['*'])}"]  # fmt: skip
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


def checkpoint_candidates(start: int, fit: bool, depth: int = 12) -> list[int]:
    """``start``, then (with ``fit``) every second block count up to ``depth``."""
    return [start] + (list(range(start + 2, depth + 1, 2)) if fit else [])


def flops_per_image(trainer: Trainer, batch: int = 16) -> float:
    """FLOP of one training step per image (fwd + bwd of the whole step, teacher included),
    counted on a small batch without recomputed blocks: the useful work, whatever the batch."""
    blocks = trainer.checkpoint_blocks
    set_checkpoint_blocks(trainer.recipe, 0)
    x = torch.randn(batch, ohs.NUM_BANDS, 64, 64, device=trainer.rt.device)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(trainer.recipe, x, 1e-4)
    set_checkpoint_blocks(trainer.recipe, blocks)
    return counter.get_total_flops() / batch


def fitted_trainer(method: str, args: argparse.Namespace) -> tuple[Trainer, float]:
    """The trainer at the largest batch (then the fewest recomputed blocks) whose eager step
    fits in memory, and its FLOP per image."""
    wanted = args.batch.get(method, args.batch["*"])
    blocks = args.checkpoint_blocks.get(method, args.checkpoint_blocks["*"])
    tries = [(b, n) for b in batch_candidates(wanted, args.fit_batch)
             for n in checkpoint_candidates(blocks, args.fit_checkpoint)]  # fmt: skip
    for batch, n_blocks in tries:
        trainer = make_trainer(method, batch, args)
        trainer.checkpoint_blocks = n_blocks
        set_checkpoint_blocks(trainer.recipe, n_blocks)
        device = trainer.rt.device
        x = torch.randn(batch, ohs.NUM_BANDS, 64, 64, device=device)
        try:
            trainer.train_step(trainer.recipe, x, 1e-4)
            sync(device)
            return trainer, flops_per_image(trainer)
        except torch.cuda.OutOfMemoryError:
            print(f"{method}: batch {batch} with {n_blocks} recomputed blocks does not fit in "
                  "memory; trying the next setting", flush=True)  # fmt: skip
        del trainer, x  # outside the except block: the traceback no longer pins the tensors
        free_memory(device)
    raise RuntimeError(f"{method}: no setting tried fits in memory ({tries})")


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


def host_syncs_per_step(trainer: Trainer, x: torch.Tensor) -> tuple[int | None, list[str]]:
    """CUDA synchronisations in one step, counted by torch's sync debug mode (CUDA only), and
    the Python lines (file:line) that made them: where to look next."""
    if trainer.rt.device.type != "cuda":
        return None, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(trainer.recipe, x, 1e-4)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return len(syncs), [f"{Path(w.filename).name}:{w.lineno}" for w in syncs]


def rate_beside_the_loader(trainer: Trainer, x: torch.Tensor, steps: int) -> float:
    """Model-only img/s while the input path runs at full speed in the background (its batches
    dropped): if this is well below the model-only rate, the loader slows the step's host side
    (threads, GIL, pinned allocations); if not, the cost is in consuming the batches."""
    stop = threading.Event()

    def drain(stream: Iterator) -> None:
        for _ in stream:
            if stop.is_set():
                return

    with DeviceBatches(trainer.loader, trainer.normalizer, trainer.rt.device) as batches:
        drainer = threading.Thread(target=drain, args=(iter(batches),), daemon=True)
        drainer.start()
        try:
            return timed_steps(trainer, lambda: x, steps)
        finally:
            stop.set()
            drainer.join(timeout=30)


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


def warm_up(step: Callable[[], Any], n: int, device: torch.device) -> float:
    """Run ``n`` untimed steps (compilation, allocator); their seconds."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - start


def mfu(flops_per_image: float, rate: float, peak: float | None) -> float | None:
    return flops_per_image * rate / peak if peak else None


def bench_method(method: str, args: argparse.Namespace, compile_: bool) -> dict[str, Any]:
    torch._dynamo.reset()  # fresh caches and counters per method
    trainer, flops_per_image = fitted_trainer(method, args)
    device, batch = trainer.rt.device, trainer.loader.batch_size
    x = torch.randn(batch, ohs.NUM_BANDS, 64, 64, device=device)
    # As the trainer compiles (CUDA graphs where the preset asks and shapes allow), unless told.
    mode = {"mode": args.compile_mode} if args.compile_mode else trainer.compile_options()
    if args.compile_backend != "inductor" and not args.compile_mode:
        mode = {}  # modes are inductor's (other backends refuse the argument)
    options = {"backend": args.compile_backend, **mode}
    if compile_:
        trainer.recipe.compile_modules(args.compile_scope, **options)
    step = lambda batch_: trainer.train_step(trainer.recipe, batch_, 1e-4)  # noqa: E731
    warmup_s = warm_up(lambda: step(x), args.warmup, device)
    reset_peak_memory(device)
    model_rate = timed_steps(trainer, lambda: x, args.steps)
    syncs, sync_sites = host_syncs_per_step(trainer, x)
    profiled = profile_or_error(trainer, x, method, args) if args.profile else {}
    with DeviceBatches(trainer.loader, trainer.normalizer, device) as prefetched:
        stream = iter(prefetched)
        step(next(stream)[0])  # the thread is running and the queue filled before timing
        e2e_rate = timed_steps(trainer, lambda: next(stream)[0], args.steps)
    serial = endless(trainer.loader)  # as the trainer fed batches before DeviceBatches
    to_device = lambda: trainer.normalizer(next(serial)[0].to(device, non_blocking=True))  # noqa: E731
    serial_rate = timed_steps(trainer, to_device, args.steps)
    beside_loader = rate_beside_the_loader(trainer, x, args.steps)
    mem_gib, mem_kind = peak_memory(device)
    loader = loader_rate(trainer, args.loader_batches)
    epochs = trainer.pc.epochs
    row = {
        "method": method, "model": getattr(trainer.cfg, method).model, "batch": batch,
        "checkpoint_blocks": trainer.checkpoint_blocks, "sdpa": args.sdpa,
        "compiled": compile_, "compile_scope": args.compile_scope if compile_ else None,
        "compile_mode": options.get("mode"), "warmup_s": warmup_s,
        "gflop_per_image_fwd_bwd": flops_per_image / 1e9,
        "model_img_per_s": model_rate, "end_to_end_img_per_s": e2e_rate,
        "end_to_end_serial_img_per_s": serial_rate, "end_to_end_over_model": e2e_rate / model_rate,
        "mfu": mfu(flops_per_image, model_rate, args.peak),
        "mfu_end_to_end": mfu(flops_per_image, e2e_rate, args.peak),
        "peak_flops": args.peak, "peak_kind": args.peak_kind,
        "peak_mem_gib": mem_gib, "peak_mem_kind": mem_kind, "loader_tiles_per_s": loader,
        "loader_over_training": loader / model_rate, "host_syncs_per_step": syncs,
        "host_sync_sites": sync_sites, "model_beside_loader_img_per_s": beside_loader,
        "full_run_hours": WHU_OHS_TRAIN_TILES * epochs / e2e_rate / 3600, "full_run_epochs": epochs,
        **(compile_counters() if compile_ else {}), **profiled,
    }  # fmt: skip
    return row  # the trainer goes with this frame; the caller frees the memory


def bench_reference(args: argparse.Namespace) -> dict[str, Any]:
    """A plain timm ViT-B/8 supervised step on (B, 32, 64, 64) with 24 classes: bf16 autocast,
    compiled as a whole, fused AdamW. No project code: the yardstick for every recipe."""
    from timm.models.vision_transformer import VisionTransformer

    torch._dynamo.reset()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = dict(embed_dim=768, depth=12, num_heads=12) if args.size == "base" else dict(
        embed_dim=64, depth=4, num_heads=4)  # fmt: skip
    model = VisionTransformer(img_size=64, patch_size=8, in_chans=ohs.NUM_BANDS,
                              num_classes=ohs.NUM_CLASSES, **size).to(device)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = args.batch.get("reference", args.batch["*"])
    x = torch.randn(batch, ohs.NUM_BANDS, 64, 64, device=device)
    y = torch.randint(0, ohs.NUM_CLASSES, (batch,), device=device)
    compiled = args.compile_reference
    net = (
        torch.compile(model, mode=args.compile_mode, backend=args.compile_backend)
        if compiled
        else model
    )

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / batch
    warmup_s = warm_up(step, args.warmup, device)
    reset_peak_memory(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    rate = batch * args.steps / (time.perf_counter() - start)
    return {"method": "reference", "model": f"timm VisionTransformer {args.size} patch 8, supervised",
            "batch": batch, "compiled": compiled, "compile_scope": "whole model" if compiled else None,
            "warmup_s": warmup_s, "gflop_per_image_fwd_bwd": flops / 1e9, "model_img_per_s": rate,
            "mfu": mfu(flops, rate, args.peak), "peak_flops": args.peak,
            "peak_mem_gib": peak_memory(device)[0]}  # fmt: skip


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
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    mode = f"compiled ({row['compile_scope']})" if row["compiled"] else "eager"
    text = (f"{row['method']:9s} {row['model']:26s} batch {row['batch']:4d} {mode:20s} | "
            f"model {row['model_img_per_s']:9.0f} img/s, MFU {pct(row['mfu'])}")  # fmt: skip
    if "end_to_end_img_per_s" in row:
        syncs = row["host_syncs_per_step"]
        text += (f" | end-to-end {row['end_to_end_img_per_s']:9.0f} img/s "
                 f"({row['end_to_end_over_model']:.2f}x model; serial feed "
                 f"{row['end_to_end_serial_img_per_s']:.0f}; model beside a running loader "
                 f"{row['model_beside_loader_img_per_s']:.0f}), MFU {pct(row['mfu_end_to_end'])} | "
                 f"full WHU-OHS run ({row['full_run_epochs']:g} epochs) {row['full_run_hours']:.1f} h | "
                 f"loader {row['loader_tiles_per_s']:.0f} tiles/s ({row['loader_over_training']:.2f}x training) | "
                 f"recomputed blocks {row['checkpoint_blocks']} | "
                 f"host syncs/step {'n/a' if syncs is None else syncs}")  # fmt: skip
    text += (f" | {row['gflop_per_image_fwd_bwd']:.2f} GFLOP/img | peak memory "
             f"{row['peak_mem_gib']:.2f} GiB | warm-up {row['warmup_s']:.1f} s")  # fmt: skip
    text += f" | graph breaks {row['graph_breaks']}" if "graph_breaks" in row else ""
    if row.get("gpu_busy") is not None and row.get("gemm_share") is not None:
        text += f" | GPU busy {row['gpu_busy']:.0%}, matmul {row['gemm_share']:.0%} of GPU time"
    return text


# -- command line -----------------------------------------------------------------------------
def parse_per_method(items: list[str], flag: str, least: int) -> dict[str, int]:
    """``["512", "dinov2=256"]`` -> {"*": 512, "dinov2": 256} (``reference``: the timm ViT)."""
    out: dict[str, int] = {}
    for item in items:
        method, _, value = item.rpartition("=")
        if method and method not in [*RECIPES, "reference"]:
            raise SystemExit(f"{flag} {item}: unknown method {method!r}; expected "
                             f"{[*RECIPES, 'reference']}")  # fmt: skip
        if not value.isdigit() or int(value) < least:
            raise SystemExit(f"{flag} {item}: expected N or METHOD=N with N >= {least}")
        out[method or "*"] = int(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--methods", nargs="+", default=list(RECIPES), choices=[*RECIPES, "reference"],
        help="what to time; reference: the plain timm ViT (as --reference)")  # fmt: skip
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
    add("--compile-mode", default=None,
        help="torch.compile mode, e.g. default or max-autotune-no-cudagraphs (default: as the "
             "trainer, reduce-overhead where pretrain.cuda_graphs applies)")  # fmt: skip
    add(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (aot_eager: no codegen)",
    )
    add("--profile", type=Path, metavar="DIR",
        help="profile 3 steps per method: top kernels to DIR/profile-<method>.txt, GPU busy "
             "fraction and matmul share into the results")  # fmt: skip
    add("--peak-tflops", type=float, default=0.0,
        help="dense bf16 peak for MFU (default: measured on this card at the start)")  # fmt: skip
    add("--reference", action="store_true",
        help="also time a plain timm ViT-B/8 supervised step (no project code) on the same input")  # fmt: skip
    add("--compile-reference", action=argparse.BooleanOptionalAction, default=None,
        help="compile the --reference ViT (default: as --compile)")  # fmt: skip
    add("--checkpoint-blocks", nargs="+", default=[], metavar="N|METHOD=N",
        help="recompute the first N blocks of each backbone in backward (pretrain.checkpoint_blocks)")  # fmt: skip
    add("--fit-checkpoint", action="store_true",
        help="recompute 2, 4, ... more blocks until one eager step fits in GPU memory")  # fmt: skip
    add("--memory-cap", type=float, default=0.0, metavar="GIB",
        help="use at most this much GPU memory (e.g. 80 to check an 80 GB card on a larger one)")  # fmt: skip
    add("--sdpa", choices=SDPA_BACKENDS, default="default",
        help="scaled-dot-product attention kernel to prefer (math stays as the fallback)")  # fmt: skip
    add("--data", type=Path, help="folder for the generated shards (reused); default a temp dir")
    add("--json", "--out", dest="json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.size = args.size or ("base" if cuda else "tiny")
    args.batch = {"*": 512 if cuda else 8} | parse_per_method(args.batch, "--batch", 2)
    args.checkpoint_blocks = {"*": 0} | parse_per_method(args.checkpoint_blocks,
                                                         "--checkpoint-blocks", 0)  # fmt: skip
    args.steps = args.steps or (3 if not cuda else 8 if args.quick else 20)
    args.warmup = args.warmup or (1 if not cuda else 2 if args.quick else 3)
    args.loader_batches = args.loader_batches or (3 if not cuda else 10 if args.quick else 20)
    most = max(args.batch.values())
    args.tiles = args.tiles or max(most * (8 if args.quick or not cuda else 16), 64)
    args.compile = cuda if args.compile is None else args.compile
    args.compile_reference = (
        args.compile if args.compile_reference is None else args.compile_reference
    )
    return args


def prefer_sdpa(backend: str) -> None:
    """Enable one fused attention kernel (plus math as the fallback); "default" leaves torch's
    own choice."""
    if backend == "default" or not torch.cuda.is_available():
        return
    torch.backends.cuda.enable_flash_sdp(backend == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(backend == "efficient")
    torch.backends.cuda.enable_cudnn_sdp(backend == "cudnn")
    torch.backends.cuda.enable_math_sdp(True)


def set_peak(args: argparse.Namespace, device: torch.device) -> None:
    """args.peak (FLOP/s, the MFU denominator) and what it is."""
    vendor = vendor_peak(device)
    if args.peak_tflops > 0:
        args.peak, args.peak_kind = args.peak_tflops * 1e12, "given (--peak-tflops)"
    else:
        args.peak, args.peak_kind = measured_matmul_peak(device), "measured 8192^3 bf16 matmul"
    if args.peak:
        print(f"bf16 matmul peak: {args.peak / 1e12:.0f} TFLOP/s ({args.peak_kind}); datasheet "
              f"{'n/a' if vendor is None else f'{vendor / 1e12:.0f}'} TFLOP/s", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; python {platform.python_version()}; "
          f"size {args.size}; compile {args.compile} ({args.compile_scope}); batch {args.batch}; "
          f"steps {args.steps} (+{args.warmup} warm-up); attention {args.sdpa}", flush=True)  # fmt: skip
    if args.memory_cap and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.memory_cap * 2**30 / total), torch.cuda.current_device()
        )
    prefer_sdpa(args.sdpa)
    set_peak(args, device)
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "rows": [], "failed": {},
                              "peak_flops": args.peak, "peak_kind": args.peak_kind,
                              "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hsissl-bench-") as tmp:
        args.data = (args.data or Path(tmp)).resolve()
        start = time.perf_counter()
        write_dataset(args.data, args.tiles)
        print(f"data: {args.tiles} random tiles as shards in {args.data} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip
        methods = [*args.methods, *(["reference"] if args.reference else [])]
        for method in dict.fromkeys(methods):  # in order, each once
            try:
                row = (
                    bench_reference(args)
                    if method == "reference"
                    else bench_or_fallback(method, args)
                )
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
