"""Pretraining throughput: images/s, MFU and peak memory per method, and loader tiles/s.

    .venv/bin/python scripts/bench_train.py [--methods mae dinov2 ssvit] [--batch N] [--steps N]
                                           [--compile/--no-compile] [--out results.json]

On CUDA: the base (ViT-B/8) models, bf16, batch 512, torch.compile. On the CPU: the tiny
variants (the numbers then only show that the benchmark runs). Data: a generated dataset
ingested into a temporary store, read back through the same loader the trainer uses.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from hsissl.config import load_config
from hsissl.pretrain.trainer import Trainer
from hsissl.stages import ingest

RECIPES = {"mae": "hsissl.pretrain.mae:MAERecipe", "dinov2": "hsissl.pretrain.dinov2:DINOv2Recipe",
           "ssvit": "hsissl.pretrain.ssvit:SSViTRecipe"}  # fmt: skip
MODELS = {
    "mae": "mae_vit_{}_patch8_64",
    "dinov2": "dinov2_vit_{}_patch8_64",
    "ssvit": "ssvit_{}_patch8_64",
}
# Dense bf16 peak of the card (vendor figure), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recipe_class(method: str):
    module, name = RECIPES[method].split(":")
    return getattr(importlib.import_module(module), name)


def make_dataset(root: Path, cuda: bool) -> list[str]:
    size, scenes = (512, 16) if cuda else (128, 4)
    overrides = [f"run_dir={root}", f"synthetic.size={size}", f"data.scene_size={size}",
                 f"synthetic.scenes={{tr: {scenes}, va: 1, ts: 1}}", "tracking.uri="]  # fmt: skip
    ingest.run(load_config(None, overrides))
    return overrides


def bench_loader(trainer: Trainer, batches: int) -> float:
    it = iter(trainer.loader)
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(trainer.loader)
            images, _ = next(it)
        n += len(images)
    return n / (time.perf_counter() - start)


def bench_method(method: str, overrides: list[str], args: argparse.Namespace, cuda: bool) -> dict:
    size = "base" if cuda else "tiny"
    extra = [f"{method}.model={MODELS[method].format(size)}", f"pretrain.batch_size={args.batch}",
             "pretrain.knn_tiles=0", f"pretrain.loader_threads={args.threads}", "pretrain.max_steps=1000000"]  # fmt: skip
    if method != "mae" and not cuda:  # CPU-sized DINO heads for the tiny check
        extra += [f"{method}.out_dim=256", f"{method}.head_hidden=64", f"{method}.head_bottleneck=32",
                  f"{method}.n_local_crops=2"]  # fmt: skip
    cfg = load_config(None, [*overrides, *extra])
    trainer = Trainer(cfg, recipe_class(method), stage=f"bench-{method}")
    device = trainer.rt.device
    model = torch.compile(trainer.recipe) if args.compile else trainer.recipe
    x = torch.randn(args.batch, 32, 64, 64, device=device)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(trainer.recipe, x, 1e-4)
    flops_per_image = counter.get_total_flops() / args.batch
    for _ in range(3):  # warm-up (and compilation)
        trainer.train_step(model, x, 1e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(model, x, 1e-4)
    sync(device)
    model_rate = args.batch * args.steps / (time.perf_counter() - start)
    stream = iter(trainer.loader)
    sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(args.steps):
        try:
            images, _ = next(stream)
        except StopIteration:
            stream = iter(trainer.loader)
            images, _ = next(stream)
        batch = trainer.normalizer(images.to(device, non_blocking=True))
        trainer.train_step(model, batch, 1e-4)
        seen += len(images)
    sync(device)
    e2e_rate = seen / (time.perf_counter() - start)
    peak = peak_flops(device)
    return {
        "method": method,
        "model": getattr(cfg, method).model,
        "batch": args.batch,
        "gflop_per_image_fwd_bwd": flops_per_image / 1e9,
        "model_img_per_s": model_rate,
        "end_to_end_img_per_s": e2e_rate,
        "mfu": flops_per_image * model_rate / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "loader_tiles_per_s": bench_loader(trainer, 20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--batch", type=int, default=0, help="default: 512 on CUDA, 8 on the CPU")
    parser.add_argument(
        "--steps", type=int, default=0, help="timed steps; default 20 on CUDA, 3 on the CPU"
    )
    parser.add_argument("--threads", type=int, default=8, help="loader threads")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.batch = args.batch or (512 if cuda else 8)
    args.steps = args.steps or (20 if cuda else 3)
    args.compile = cuda if args.compile is None else args.compile
    device = (
        torch.cuda.get_device_name(0)
        if cuda
        else f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {device}; torch {torch.__version__}; compile={args.compile}; batch {args.batch}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = make_dataset(Path(tmp), cuda)
        for method in args.methods:
            try:
                row = bench_method(method, overrides, args, cuda)
            except ImportError as exc:
                print(f"{method}: skipped ({exc})")
                continue
            rows.append(row)
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            mem = f"{row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else "n/a"
            print(f"{method:7s} {row['model']:28s} model {row['model_img_per_s']:9.0f} img/s | end-to-end "
                  f"{row['end_to_end_img_per_s']:9.0f} img/s | {row['gflop_per_image_fwd_bwd']:.2f} GFLOP/img | "
                  f"MFU {mfu} | peak {mem} | loader {row['loader_tiles_per_s']:.0f} tiles/s")  # fmt: skip
    if args.out:
        args.out.write_text(
            json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
