"""Tracking that survives: concurrent first use of a sqlite store, and an MLflow server killed
mid-run (real MLflow 3.17 server on loopback, see conftest_mlflow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hsissl import tracking, tracking_outbox
from hsissl.config import load_config

REPO = Path(__file__).resolve().parents[1]

STAGE_AT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hsissl import tracking
    from hsissl.config import load_config

    run_dir, stage, start_at = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    cfg = load_config(None, [f"run_dir={run_dir}", "tracking.uri="])
    while time.time() < start_at:  # imports done: start together
        time.sleep(0.001)
    with tracking.start_run(cfg, stage=stage, run_dir=run_dir) as tracker:
        tracker.log_metrics({"x": 1.0}, step=1)
    print("ok", stage)
    """
)


def test_stages_started_together_in_a_fresh_run_folder_all_start(tmp_path: Path) -> None:
    """MLflow creates the sqlite schema on first use; two stages doing that at once failed
    with ``OperationalError: table … already exists`` / ``duplicate column name`` (2 of 2
    trials here without the lock)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    for trial in range(2):
        run_dir = tmp_path / f"run{trial}"
        start_at = time.time() + 8  # after the imports of both (2 shared cores: slow)
        procs = [subprocess.Popen([sys.executable, "-c", STAGE_AT, str(run_dir), stage,
                                   str(start_at)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for stage in ("ingest", "pretrain-mae")]  # fmt: skip
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
            assert out.startswith("ok")


def _runs(url: str) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    return {r.info.run_name: r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}  # fmt: skip


def _steps(url: str, run_id: str, key: str = "loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=url).get_metric_history(run_id, key))


def test_mlflow_killed_mid_run_ends_finished_with_every_step(
    killable_mlflow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fewer HTTP retries than HTTP_LIMITS: each failed call would otherwise wait ~7 s here.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    url = killable_mlflow.url
    dirs = {"synced": tmp_path / "run1", "next": tmp_path / "run2"}  # one run in each folder
    cfgs = {k: load_config(None, [f"run_dir={d}", f"tracking.uri={url}"]) for k, d in dirs.items()}
    with (tracking.start_run(cfgs["synced"], "pretrain-mae", dirs["synced"]) as a,
          tracking.start_run(cfgs["next"], "pretrain-dinov2", dirs["next"]) as b):  # fmt: skip
        for step in range(1, 6):
            a.log_metrics({"loss": 1.0 / step}, step=step)
            b.log_metrics({"loss": 1.0 / step}, step=step)
        killable_mlflow.kill()  # SIGKILL mid-run
        for step in range(6, 11):
            a.log_metrics({"loss": 1.0 / step}, step=step)
            b.log_metrics({"loss": 1.0 / step}, step=step)
        a.set_tags({"after_outage": "yes"})
    boxes = {"synced": tracking_outbox.path_for(dirs["synced"], a.run_id),
             "next": tracking_outbox.path_for(dirs["next"], b.run_id)}  # fmt: skip
    kept = json.loads(boxes["synced"].read_text())
    assert kept["status"] == "FINISHED" and kept["tags"] == {"after_outage": "yes"}
    assert sorted(m[3] for m in kept["metrics"]) == [6, 7, 8, 9, 10]
    killable_mlflow.start()  # same port, same store
    assert _runs(url)["pretrain-mae"].info.status == "RUNNING"  # what MLflow shows meanwhile

    # `hsissl tracking sync <run_dir>` sends what the outage kept ...
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    sync = subprocess.run([sys.executable, "-m", "hsissl.cli", "tracking", "sync",
                           str(dirs["synced"])], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert sync.returncode == 0, sync.stderr
    assert f"run {a.run_id}: 5 metrics, status FINISHED" in sync.stdout
    # ... and so does the next command of a run folder that reaches MLflow.
    with tracking.start_run(cfgs["next"], stage="finetune", run_dir=dirs["next"]):
        pass
    runs = _runs(url)
    for name, run_id in (("pretrain-mae", a.run_id), ("pretrain-dinov2", b.run_id)):
        assert runs[name].info.status == "FINISHED", name
        assert _steps(url, run_id) == list(range(1, 11)), name  # every step, none twice
    assert runs["pretrain-mae"].data.tags["after_outage"] == "yes"
    assert not any(box.exists() for box in boxes.values())
