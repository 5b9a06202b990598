"""Several GPUs in one pod: the pretraining stage under torchrun, one process per GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from hsissl.presets import managed_overrides, resolve_preset
from hsissl.stages.pretrained import encoder_uri
from hsissl.stages.results import PretrainResult

GPUS_ENV = "HSISSL_GPUS"  # processes per pod for torchrun; default: visible CUDA devices


def processes_per_pod() -> int:
    if os.environ.get(GPUS_ENV):
        return int(os.environ[GPUS_ENV])
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:  # pragma: no cover - the images always carry torch
        return 1


def torchrun_command(stage: str, preset: str, overrides: list[str], wiring: dict[str, Any],
                     procs: int) -> list[str]:  # fmt: skip
    """One pod, ``procs`` processes (one per GPU): torchrun running ``hsissl <stage>``."""
    preset_path = resolve_preset(preset)
    config = ["--config", str(preset_path)] if preset_path else []
    managed = managed_overrides(wiring)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={procs}", "-m", "hsissl.cli", stage, *config, *overrides, *managed]  # fmt: skip


def pretrain(stage: str, preset: str, overrides: list[str], wiring: dict[str, Any], procs: int,
             cfg) -> PretrainResult:  # fmt: skip
    """Run ``hsissl <stage>`` under torchrun; its encoder record (rank 0 prints the rest)."""
    subprocess.run(torchrun_command(stage, preset, overrides, wiring, procs), check=True)
    return PretrainResult(encoder_uri(cfg))
