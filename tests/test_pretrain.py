"""The shared trainer with the MAE recipe: learning, checkpoints, exact resume after a kill."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hsissl.config import ConfigError, load_config
from hsissl.data.normalize import NormalizerMismatch
from hsissl.data.shards import ShardDataset
from hsissl.layout import HISTORY, TRAIN_STATE, checkpoint_key, storage_of
from hsissl.pretrain import checkpoint
from hsissl.pretrain.dinov2 import DINOv2Recipe
from hsissl.pretrain.mae import MAERecipe
from hsissl.pretrain.trainer import cosine_lr, pretrain
from hsissl.stages import ingest

REPO = Path(__file__).resolve().parents[1]


def mae_overrides(run_dir: Path, **extra: object) -> list[str]:
    base = {
        "run_dir": run_dir, "synthetic.scenes": "{tr: 4, va: 1, ts: 1}", "synthetic.size": 128,
        "data.scene_size": 128, "pretrain.batch_size": 16, "pretrain.max_steps": 12,
        "pretrain.ckpt_every": 4, "pretrain.log_every": 1, "pretrain.knn_tiles": 64,
        "pretrain.deterministic": "true", "pretrain.loader_threads": 1,
        "mae.model": "mae_vit_tiny_patch8_64", "mae.lr": 3.2e-2, "tracking.uri": "",
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    """A run folder holding an ingested small generated dataset."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    ingest.run(load_config(REPO / "configs" / "tiny.yaml", mae_overrides(run_dir)))
    return run_dir


def cfg_for(run_dir: Path, **extra: object):
    return load_config(REPO / "configs" / "tiny.yaml", mae_overrides(run_dir, **extra))


def losses(run_dir: Path) -> list[float]:
    with sqlite3.connect(run_dir / "mlflow.db") as con:
        rows = con.execute(
            "select m.step, m.value from metrics m join runs r on m.run_uuid = r.run_uuid "
            "where m.key = 'loss' and r.status = 'FINISHED' order by r.start_time desc, m.step"
        ).fetchall()
    return [v for _, v in rows]


def test_cosine_schedule_warms_up_then_decays():
    cfg = load_config(None, ["mae.lr=1.0", "mae.min_lr=0.0", "mae.warmup_fraction=0.1"]).mae
    assert cosine_lr(0, 100, cfg, 256) == pytest.approx(0.1)
    assert cosine_lr(9, 100, cfg, 256) == pytest.approx(1.0)
    assert cosine_lr(55, 100, cfg, 256) == pytest.approx(0.5, abs=0.02)
    assert cosine_lr(99, 100, cfg, 256) < 0.01
    assert cosine_lr(9, 100, cfg, 1024) == pytest.approx(4.0)  # the peak scales with the batch


def test_mae_learns_and_writes_an_encoder_record(synthetic_run):
    cfg = cfg_for(synthetic_run, **{"pretrain.name": "learn", "pretrain.max_steps": 40,
                                    "pretrain.deterministic": "false", "pretrain.knn_every": 20})  # fmt: skip
    result = pretrain(cfg, MAERecipe, stage="pretrain-mae")
    history = losses(synthetic_run)
    assert len(history) == 40
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.8 * first, f"MAE loss did not decrease: {first:.3f} -> {last:.3f}"
    encoder, normalizer, record = checkpoint.load_model(result["encoder_uri"])
    dataset = ShardDataset(storage_of(cfg).join("datasets/whu-ohs"))
    assert normalizer == dataset.normalizer and record["method"] == "mae" and record["step"] == 40
    tokens = encoder.forward_features(torch.zeros(2, 32, 64, 64))
    assert tokens.shape == (2, 65, 64)
    assert 0.0 <= result["metrics"]["knn_acc"] <= 1.0
    # the k-NN curve lands in the history the report plots (not only in MLflow)
    saved = json.loads(storage_of(cfg).get_bytes(checkpoint_key("learn", HISTORY)))
    knn = {h["step"]: h["knn_acc"] for h in saved if "knn_acc" in h}
    assert set(knn) == {0, 20, 40} and knn[40] == result["metrics"]["knn_acc"]  # 0: untrained
    assert [h["step"] for h in saved] == sorted({h["step"] for h in saved})  # one entry a step


def test_a_callers_probe_replaces_the_tile_knn_from_the_untrained_encoder_on(synthetic_run):
    """evaluate-real's pixel k-NN is such a probe: it gets the frozen encoder (eval mode, no
    grad) at step 0, every knn_every steps and at the end, and its metrics reach the history."""
    calls: list[tuple[bool, bool]] = []

    def probe(encoder: torch.nn.Module) -> dict[str, float]:
        calls.append((encoder.training, torch.is_grad_enabled()))
        return {"knn_pixel_miou": float(len(calls))}

    cfg = cfg_for(synthetic_run, **{"pretrain.name": "probed", "pretrain.max_steps": 5,
                                    "pretrain.knn_every": 2})  # fmt: skip
    result = pretrain(cfg, MAERecipe, stage="pretrain-mae", probe=probe)
    assert calls == [(False, False)] * 4  # steps 0, 2, 4 and the end (5)
    assert result["metrics"]["knn_pixel_miou"] == 4.0 and "knn_acc" not in result["metrics"]
    saved = json.loads(storage_of(cfg).get_bytes(checkpoint_key("probed", HISTORY)))
    assert {h["step"]: h["knn_pixel_miou"] for h in saved if "knn_pixel_miou" in h} == {
        0: 1.0,
        2: 2.0,
        4: 3.0,
        5: 4.0,
    }


def test_the_peak_rate_counts_every_process_of_a_torchrun(synthetic_run, monkeypatch):
    """Under torchrun the global batch is the per-device batch x the world size."""
    from hsissl.pretrain import trainer
    from hsissl.pretrain.runtime import Runtime

    cfg = cfg_for(synthetic_run, **{"pretrain.device": "cpu"})  # 16 per device
    one = trainer.Trainer(cfg, MAERecipe, "pretrain-mae")
    assert one.optimizer.param_groups[0]["lr"] == 2e-3  # 3.2e-2 x 16 / 256, as before the rule
    cfg = cfg_for(synthetic_run, **{"pretrain.device": "cpu", "pretrain.batch_size": 4})
    monkeypatch.setattr(trainer, "setup", lambda *a, **k: Runtime(torch.device("cpu"), 0, 4))
    four = trainer.Trainer(cfg, MAERecipe, "pretrain-mae")  # 4 ranks of 4 (16 training tiles)
    assert four.global_batch == 16
    assert four.optimizer.param_groups[0]["lr"] == 2e-3  # = 4 x the rate of one rank of 4
    warmup = int(cfg.mae.warmup_fraction * 100)
    assert cosine_lr(warmup - 1, 100, cfg.mae, four.global_batch) == pytest.approx(2e-3)  # peak


def _weights(uri: str) -> dict[str, torch.Tensor]:
    encoder, _, _ = checkpoint.load_model(uri)
    return encoder.state_dict()


def test_kill_and_resume_gives_the_uninterrupted_weights(synthetic_run):
    reference = pretrain(
        cfg_for(synthetic_run, **{"pretrain.name": "straight"}), MAERecipe, "pretrain-mae"
    )
    args = ["pretrain-mae", "--config", str(REPO / "configs" / "tiny.yaml"),
            *mae_overrides(synthetic_run, **{"pretrain.name": "killed"})]  # fmt: skip
    key = "checkpoints/killed/train.pt"
    proc = subprocess.Popen([sys.executable, "-m", "hsissl.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while (not storage_of(cfg_for(synthetic_run)).exists(key) and proc.poll() is None
           and time.monotonic() < deadline):  # fmt: skip
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):  # it may have finished already
        os.killpg(proc.pid, signal.SIGKILL)  # wherever it is: a committed checkpoint resumes
    proc.wait()
    store = storage_of(cfg_for(synthetic_run))
    assert store.exists(key), "the killed run never wrote a checkpoint"
    killed_at = torch.load(io.BytesIO(store.get_bytes(key)), weights_only=False)["step"]
    resumed = pretrain(
        cfg_for(synthetic_run, **{"pretrain.name": "killed"}), MAERecipe, "pretrain-mae"
    )
    assert resumed["resumed"] and killed_at < 12
    a, b = _weights(reference["encoder_uri"]), _weights(resumed["encoder_uri"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume from step {killed_at}"


def test_resume_refuses_a_checkpoint_from_other_statistics(synthetic_run, tmp_path):
    cfg = cfg_for(synthetic_run, **{"pretrain.name": "foreign", "pretrain.max_steps": 4})
    pretrain(cfg, MAERecipe, "pretrain-mae")
    # The same checkpoint folder, now next to a dataset with different band statistics.
    other = cfg_for(tmp_path / "other", **{"pretrain.name": "foreign", "synthetic.seed": 5})
    ingest.run(other)
    store = storage_of(other)
    store.put_bytes("checkpoints/foreign/train.pt",
                    storage_of(cfg).get_bytes("checkpoints/foreign/train.pt"))  # fmt: skip
    with pytest.raises(NormalizerMismatch, match="was normalised with statistics"):
        pretrain(other, MAERecipe, "pretrain-mae")


def test_resume_refuses_changed_method_settings(synthetic_run):
    pretrain(
        cfg_for(synthetic_run, **{"pretrain.name": "changed", "pretrain.max_steps": 2}),
        MAERecipe,
        "pretrain-mae",
    )
    with pytest.raises(ConfigError, match=r"other settings \(mae.lr: 0.032 -> 0.016\)"):
        pretrain(
            cfg_for(synthetic_run, **{"pretrain.name": "changed", "mae.lr": 1.6e-2}),
            MAERecipe,
            "pretrain-mae",
        )
    # the loader position and the schedule depend on the batch: refused too
    with pytest.raises(ConfigError, match=r"pretrain.batch_size: 16 -> 8"):
        pretrain(cfg_for(synthetic_run, **{"pretrain.name": "changed", "pretrain.batch_size": 8}),
                 MAERecipe, "pretrain-mae")  # fmt: skip
    # a longer run is a continuation, not a change
    longer = cfg_for(synthetic_run, **{"pretrain.name": "changed", "pretrain.max_steps": 3})
    assert pretrain(longer, MAERecipe, "pretrain-mae")["resumed"] is True


def test_resume_refuses_another_methods_checkpoint(synthetic_run):
    pretrain(cfg_for(synthetic_run, **{"pretrain.name": "shared", "pretrain.max_steps": 1}),
             MAERecipe, "pretrain-mae")  # fmt: skip
    with pytest.raises(ConfigError, match=r"holds a mae training state, not dinov2"):
        pretrain(cfg_for(synthetic_run, **{"pretrain.name": "shared"}), DINOv2Recipe,
                 "pretrain-dinov2")  # fmt: skip


def test_cuda_is_optional():
    cfg = load_config(None, ["pretrain.device=cuda"])
    if torch.cuda.is_available():
        pytest.skip("CUDA present; this checks the CPU-only error path")
    from hsissl.pretrain.runtime import setup

    with pytest.raises(RuntimeError, match="CUDA is not available"):
        setup(cfg.pretrain.device)
    assert setup("auto").device.type == "cpu"


def test_mae_recipe_trains_with_the_configured_dropout_and_saves_an_encoder_without_it():
    cfg = load_config(None, ["mae.model=mae_vit_tiny_patch8_64", "mae.drop_rate=0.2"])
    recipe = MAERecipe(cfg)
    rates = {m.p for m in recipe.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
    assert rates == {0.2}
    assert "drop_rate" not in recipe.build()["kwargs"]  # the saved encoder is rebuilt without it


DDP_SCRIPT = """
import sys, torch
from hsissl.config import load_config
from hsissl.pretrain.dinov2 import DINOv2Recipe
from hsissl.pretrain.trainer import Trainer

trainer = Trainer(load_config(sys.argv[1], sys.argv[3:]), DINOv2Recipe, "pretrain-dinov2")
result = trainer.fit()
first = next(iter(trainer.loader))[0]  # this rank's share of the next batch
torch.save({"state": trainer.recipe.state_dict(), "tiles": first, "result": result},
           f"{sys.argv[2]}/rank{trainer.rt.rank}.pt")
"""


def test_two_processes_under_torchrun_train_one_dinov2_model(synthetic_run, tmp_path):
    """DDP on the CPU (gloo): each rank reads its own tiles, and student, teacher and centering
    stay identical on both ranks (the teacher is synced once, then moved by the same EMA)."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    overrides = mae_overrides(synthetic_run, **{"pretrain.name": "ddp", "pretrain.max_steps": 3,
                                                "pretrain.batch_size": 4, "pretrain.knn_tiles": 0})  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script),
           str(REPO / "configs" / "tiny.yaml"), str(tmp_path), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["result"]["steps"] == 3 and ranks[0]["result"]["encoder_uri"]
    assert ranks[1]["result"]["encoder_uri"] == ""  # only rank 0 writes
    assert not torch.equal(ranks[0]["tiles"], ranks[1]["tiles"])  # sharded input
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between the ranks"


def _rewrite(store, state: dict) -> None:
    with store.transaction(checkpoint_key("old-lr")) as tx:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        tx.commit({TRAIN_STATE: buffer.getvalue()})


def test_a_state_saved_before_the_lr_scaling_rule_resumes_at_its_peak_rate(synthetic_run):
    """A train.pt written before presets stated base rates holds the peak rate as ``lr`` (at
    batch 16: 0.002 = base 0.032 x 16 / 256); it resumes under the base-rate preset, and a
    rate that really changed is still refused."""
    cfg = cfg_for(synthetic_run, **{"pretrain.name": "old-lr", "pretrain.max_steps": 2})
    pretrain(cfg, MAERecipe, "pretrain-mae")
    store, key = storage_of(cfg), checkpoint_key("old-lr", TRAIN_STATE)
    state = checkpoint.load(store, key)
    assert state.pop("lr_reference_batch") == 256
    state["config"]["mae"]["lr"] = cfg.mae.scaled_lr(cfg.pretrain.batch_size)  # the old meaning
    _rewrite(store, state)
    longer = cfg_for(synthetic_run, **{"pretrain.name": "old-lr", "pretrain.max_steps": 3})
    assert pretrain(longer, MAERecipe, "pretrain-mae")["resumed"] is True
    state["config"]["mae"]["lr"] *= 2  # a peak rate that is not this preset's
    _rewrite(store, state)
    with pytest.raises(ConfigError, match=r"other settings \(mae.lr: "):
        pretrain(longer, MAERecipe, "pretrain-mae")
