"""hsissl.tracking against a real MLflow server, and against the no-server sqlite default."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hsissl.config import Config, to_yaml
from hsissl.tracking import resolve_uri, run_name, start_run


def _cfg(uri: str) -> Config:
    cfg = Config()
    cfg.tracking.uri = uri
    cfg.tracking.experiment = "test-tracking"
    cfg.data.tile_size = 32
    cfg.data.source = "s" * 7000  # longer than MLflow's 6000-char param limit
    return cfg


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("MLFLOW_TRACKING_URI", "HSISSL_PARENT_RUN_ID", "KFP_RUN_ID", "HSISSL_GIT_SHA"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_resolve_uri_precedence(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_dir = tmp_path / "a" / "run"
    assert resolve_uri("", run_dir) == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    assert run_dir.is_dir()
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_uri("", run_dir) == "http://env:5000"
    assert resolve_uri("http://configured:5000", run_dir) == "http://configured:5000"


def test_run_logs_config_metrics_tags_artifacts(
    mlflow_server: str, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("KFP_RUN_ID", "kfp-123")
    clean_env.setenv("HSISSL_GIT_SHA", "abc123")
    cfg = _cfg(mlflow_server)
    extra = tmp_path / "note.txt"
    extra.write_text("hello")
    with start_run(cfg, "pretrain", tmp_path / "run", tags={"variant": "base"}) as tracker:
        tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step=0)
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.log_dict({"miou": 0.42}, "eval/final.json")
        tracker.log_artifact(extra, "notes")
        tracker.set_tags({"phase": "done"})

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "pretrain"
    params = run.data.params
    assert params["data.tile_size"] == "32"
    assert params["tracking.experiment"] == "test-tracking"
    assert params["synthetic.scenes.tr"] == "8"
    assert params["data.source"] == "s" * 6000
    tags = run.data.tags
    assert tags["stage"] == "pretrain"
    assert tags["kfp_run_id"] == "kfp-123"
    assert tags["git_sha"] == "abc123"
    assert tags["variant"] == "base"
    assert tags["phase"] == "done"
    assert "mlflow.parentRunId" not in tags

    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5)]

    out = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path / "dl")))
    assert (out / "config.yaml").read_text() == to_yaml(cfg)
    assert json.loads((out / "eval" / "final.json").read_text()) == {"miou": 0.42}
    assert (out / "notes" / "note.txt").read_text() == "hello"


def test_naming_tags_rename_the_run_and_log_the_resolved_encoder(
    mlflow_server: str, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = _cfg(mlflow_server)
    encoder = "s3://bucket/checkpoints/mae-local-20261126-5db01b/encoder.pt"
    with start_run(cfg, "finetune", tmp_path) as finetune:  # as stages/finetune.py tags it
        finetune.set_tags({"encoder_uri": encoder, "method": "mae", "results": "finetune-mae-conv"})
        finetune.set_tags({"encoder_uri": "random:vit", "phase": "eval"})  # names nothing now
    with start_run(cfg, "pretrain-mae", tmp_path) as pretrain:  # tagged when it saves
        pretrain.set_tags({"encoder_uri": encoder})
    with start_run(cfg, "pca-poc", tmp_path) as pca:
        pca.set_tags({"results": "file:///store/results/pca-poc"})

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(finetune.run_id)
    assert run.info.run_name == "finetune-mae-conv"
    assert run.data.params["encoder_uri"] == encoder  # the config's finetune.encoder may be ''
    assert run.data.tags["encoder_uri"] == "random:vit"  # tags still follow the last call
    assert client.get_run(pretrain.run_id).info.run_name == "pretrain-mae-local-20261126-5db01b"
    assert client.get_run(pretrain.run_id).data.params["encoder_uri"] == encoder
    assert client.get_run(pca.run_id).info.run_name == "pca-poc"


@pytest.mark.parametrize(
    ("stage", "output", "expected"),
    [
        ("finetune", "finetune-mae-linear", "finetune-mae-linear"),
        ("finetune", "heads-lr3", "finetune-heads-lr3"),
        ("baseline-deeplabv3plus", "baseline-deeplabv3plus", "baseline-deeplabv3plus"),
        ("pretrain-mae", "file:///s/checkpoints/mae-a1/encoder.pt", "pretrain-mae-a1"),
        ("pretrain-dinov2", "s3://b/checkpoints/dinov2/encoder.pt", "pretrain-dinov2"),
        ("pretrain-mae", "", "pretrain-mae"),
    ],
)
def test_run_name_joins_stage_and_output_without_repeats(
    stage: str, output: str, expected: str
) -> None:
    assert run_name(stage, output) == expected


def test_nested_runs_carry_parent_tag(
    mlflow_server: str, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = _cfg(mlflow_server)
    with start_run(cfg, "pipeline", tmp_path) as parent:
        with start_run(cfg, "tile", tmp_path, parent_run_id=parent.run_id) as child:
            pass
        clean_env.setenv("HSISSL_PARENT_RUN_ID", parent.run_id)  # how KFP steps pass it on
        with start_run(cfg, "pretrain", tmp_path) as env_child:
            pass

    client = MlflowClient(tracking_uri=mlflow_server)
    for run_id in (child.run_id, env_child.run_id):
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert "mlflow.parentRunId" not in client.get_run(parent.run_id).data.tags


def test_exception_marks_run_failed(
    mlflow_server: str, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with start_run(_cfg(mlflow_server), "segment", tmp_path) as tracker:
            raise RuntimeError("boom")
    run = MlflowClient(tracking_uri=mlflow_server).get_run(tracker.run_id)
    assert run.info.status == "FAILED"


def test_default_sqlite_store_without_server(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    clean_env.chdir(cwd)
    run_dir = tmp_path / "run"
    with start_run(_cfg(""), "tile", run_dir) as tracker:
        tracker.log_metrics({"tiles": 12.0})

    with sqlite3.connect(run_dir / "mlflow.db") as db:
        rows = db.execute(
            "SELECT name, status FROM runs WHERE run_uuid = ?", (tracker.run_id,)
        ).fetchall()
    assert rows == [("tile", "FINISHED")]
    # artifacts live beside the DB, not in whatever the cwd happens to be
    config_copy = run_dir / "mlartifacts" / tracker.run_id / "artifacts" / "config.yaml"
    assert config_copy.read_text() == to_yaml(_cfg(""))
    assert list(cwd.iterdir()) == []
