"""What a stage hands its library calls: built once per stage run (:func:`context_of`).

A stage that trains or evaluates on a device needs the same few things in every call (the
device, the seed, bf16 autocast, how often to log and where to, the artifact store and the run
folder); one frozen value carries them instead of each call taking them one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hsissl.config import Config
from hsissl.layout import run_dir_of, storage_of
from hsissl.pretrain.runtime import Runtime, autocast, setup
from hsissl.storage import Storage

LogFn = Callable[[dict[str, float], int], None]  # (metrics, step), e.g. Tracker.log_metrics


@dataclass(frozen=True)
class StageContext:
    rt: Runtime  # device, rank, world size (set up, seeded)
    store: Storage  # the artifact store (``storage.uri``)
    run_dir: Path  # the local run folder (``run_dir``)
    seed: int = 0  # ``seed``: loaders, random encoders, masks
    amp: bool = True  # ``pretrain.amp``: bf16 autocast on CUDA
    log_every: int = 20  # ``pretrain.log_every``: steps between logged training metrics
    loader_threads: int = 4  # ``pretrain.loader_threads`` (finetune has its own setting)
    log: LogFn | None = None  # where training metrics go: the stage's tracker once it runs

    @property
    def device(self) -> torch.device:
        return self.rt.device

    def autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA if ``amp``; a disabled context on the CPU."""
        return autocast(self.rt, self.amp)

    def logging_to(self, log: LogFn) -> StageContext:
        """This context with training metrics sent to ``log`` (the tracker opens after set-up)."""
        return replace(self, log=log)


def context_of(cfg: Config, deterministic: bool | None = None) -> StageContext:
    """Set up the device and seed (:func:`hsissl.pretrain.runtime.setup`) and collect the rest
    from ``cfg``; ``deterministic`` defaults to ``pretrain.deterministic``."""
    pc = cfg.pretrain
    if deterministic is None:
        deterministic = pc.deterministic
    return StageContext(
        rt=setup(pc.device, cfg.seed, deterministic),
        store=storage_of(cfg),
        run_dir=run_dir_of(cfg),
        seed=cfg.seed,
        amp=pc.amp,
        log_every=pc.log_every,
        loader_threads=pc.loader_threads,
    )
