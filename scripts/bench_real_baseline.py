"""evaluate-real's DeepLabV3+ training step on the CPU, fp32 vs bf16 autocast.

Most of ``hsissl evaluate-real``'s time is DeepLabV3+ from scratch (a batch of the scene's 8
dihedral views per step). This times ``real_eval.train_dense``, the code evaluate-real runs,
at each shared scene's size on random input: the median of ``--repeats`` runs of ``--steps``
steps, minus a 1-step run (model build and prediction), per step.

    .venv/bin/python scripts/bench_real_baseline.py --sizes 128 95 70
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from hsissl.pretrain.runtime import cpu_bf16
from hsissl.segment.baseline import DeepLabV3PlusAux
from hsissl.segment.real_eval import train_dense


def run_seconds(size: int, steps: int, bf16: bool) -> float:
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.standard_normal((1, 32, size, size), dtype=np.float32))
    label = rng.integers(1, 5, (size, size))
    train = rng.random((size, size)) < 0.1  # the few-label share of training pixels
    torch.manual_seed(0)
    model = DeepLabV3PlusAux(encoder="resnet18d", in_channels=32)
    start = time.perf_counter()
    train_dense(model, image, label, train, steps, 1e-3, seed=0, bf16=bf16)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 95, 70],
                        help="scene sides in px (Houston 128, Samson 95, Indian Pines 70)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "bf16_in_hardware": cpu_bf16(), "torch": torch.__version__}))  # fmt: skip
    for size in args.sizes:
        row: dict[str, float | int] = {"size": size}
        for bf16 in (False, True):
            base = statistics.median(run_seconds(size, 1, bf16) for _ in range(args.repeats))
            full = statistics.median(
                run_seconds(size, args.steps + 1, bf16) for _ in range(args.repeats)
            )
            row["bf16_ms" if bf16 else "fp32_ms"] = round(1000 * (full - base) / args.steps, 1)
        row["speedup"] = round(row["fp32_ms"] / row["bf16_ms"], 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
