"""Probe-only lever runs for docs/real-data.md ("Levers measured"): fast, no trained heads.

Pretrains the methods of ``configs/real.yaml`` (or reuses the checkpoints of an earlier run in
the same ``run_dir``), then per scene and seed of the few-label protocol scores the per-pixel
floors and logistic-regression probes on the frozen features of each encoder and of the
random-init control, with and without the normalised spectrum concatenated, at a few
regularisation strengths. One JSON line per (scene, seed), then mean ± std per row.

    .venv/bin/python scripts/real_probe_levers.py run_dir=runs/levers "real.scenes=[Indian_subset]"
    VARIANTS='[["spec-probe", 1.0, 4]]' .venv/bin/python scripts/real_probe_levers.py ...

A variant is [name, C, blocks]: the last |blocks| of the 4 probed blocks' features, with the
spectrum in front when blocks > 0; C is the inverse L2 strength of the logistic regression.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hsissl.config import load_config
from hsissl.segment import real_eval
from hsissl.segment.blocks import protocol_split
from hsissl.stages.evaluate_real import pretrain_encoders

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = [["probe", 1.0, -4], ["spec-probe", 1.0, 4], ["spec-probe-C0.1", 0.1, 4],
                    ["spec-probe-C0.01", 0.01, 4], ["spec-last-C0.1", 0.1, 1]]  # fmt: skip


def main(overrides: list[str]) -> None:
    variants = json.loads(os.environ.get("VARIANTS", "null")) or DEFAULT_VARIANTS
    cfg = load_config(REPO / "configs" / "real.yaml", overrides)
    root = Path(cfg.real.source).expanduser().resolve()
    start = time.perf_counter()
    encoders, normalizer, _ = pretrain_encoders(cfg, root)
    print(f"pretraining {time.perf_counter() - start:.0f} s", flush=True)
    block, fraction = cfg.real.protocols["few-label"]
    scores: dict[str, dict[str, list[float]]] = {}
    for name in cfg.real.scenes:
        image, label = real_eval.load_eval_scene(root, name)
        x = normalizer(torch.from_numpy(image))  # (32, H, W)
        spectrum = x.numpy()
        feats = {k: real_eval.pixel_features(e, x, cfg.real.window_stride).numpy()
                 for k, e in encoders.items()}  # fmt: skip
        for seed in cfg.real.seeds:
            train, test = protocol_split(label, int(block), float(fraction), seed)
            row = real_eval.floor_scores(spectrum, label, train, test, seed)
            for enc, f in feats.items():
                for tag, c, blocks in variants:
                    part = f[-abs(blocks) * f.shape[0] // 4 :]  # the last |blocks| of 4 blocks
                    inputs = np.concatenate([spectrum, part]) if blocks > 0 else part
                    row[f"{enc}+{tag}"] = real_eval.miou(
                        real_eval.pixel_classifier("lr", inputs, label, train, seed, c), label, test
                    )
            print(json.dumps({"scene": name, "seed": seed} | {k: round(100 * v, 1) for k, v in row.items()}),
                  flush=True)  # fmt: skip
            for k, v in row.items():
                scores.setdefault(name, {}).setdefault(k, []).append(100 * v)
    for name, rows in scores.items():
        print(f"## {name}, few-label, {len(cfg.real.seeds)} seeds")
        for k, v in sorted(rows.items(), key=lambda kv: -np.mean(kv[1])):
            print(f"{k:32s} {np.mean(v):5.1f} ± {np.std(v):4.1f}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
