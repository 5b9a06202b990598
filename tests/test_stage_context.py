"""The one context a stage builds for its library calls (hsissl.pretrain.context)."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import pytest
import torch

from hsissl.config import load_config
from hsissl.layout import storage_of
from hsissl.pretrain.context import context_of


def test_context_carries_the_config_and_logs_only_once_pointed_at_a_tracker(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "tracking.uri=", "seed=5",
                             "pretrain.device=cpu", "pretrain.amp=false", "pretrain.log_every=7",
                             "pretrain.loader_threads=2"])  # fmt: skip
    ctx = context_of(cfg)
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3))  # seeded with cfg.seed
    assert ctx.device == torch.device("cpu") and ctx.rt.world_size == 1
    assert (ctx.seed, ctx.amp, ctx.log_every, ctx.loader_threads) == (5, False, 7, 2)
    assert ctx.run_dir == (tmp_path / "run").resolve() and ctx.run_dir.is_dir()
    assert ctx.store.join("results/x") == storage_of(cfg).join("results/x")
    with replace(ctx, amp=True).autocast():  # bf16 only on CUDA: the CPU computes in fp32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    logged: list[tuple[dict[str, float], int]] = []
    tracked = ctx.logging_to(lambda metrics, step: logged.append((metrics, step)))
    assert ctx.log is None and tracked.log is not None and tracked.rt is ctx.rt
    tracked.log({"loss": 1.0}, 3)
    assert logged == [({"loss": 1.0}, 3)]
    with pytest.raises(FrozenInstanceError):
        ctx.seed = 1  # type: ignore[misc]
