"""hsissl.tracking against a real MLflow server, and against the no-server sqlite default."""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow.tracking import MlflowClient

from hsissl.config import Config, to_yaml
from hsissl.tracking import HTTP_LIMITS, TrackingError, resolve_uri, run_name, start_run


def _cfg(uri: str) -> Config:
    cfg = Config()
    cfg.tracking.uri = uri
    cfg.tracking.experiment = "test-tracking"
    cfg.data.tile_size = 32
    cfg.data.source = "s" * 7000  # longer than MLflow's 6000-char param limit
    return cfg


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("MLFLOW_TRACKING_URI", "HSISSL_PARENT_RUN_ID", "KFP_RUN_ID", "HSISSL_GIT_SHA",
                 *HTTP_LIMITS):  # fmt: skip
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


def test_runs_are_renamed_after_their_output_and_log_the_resolved_encoder(
    mlflow_server: str, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = _cfg(mlflow_server)
    encoder = "s3://bucket/checkpoints/mae-local-20261126-5db01b/encoder.pt"
    with start_run(cfg, "finetune", tmp_path) as finetune:  # as stages/finetune.py does
        finetune.set_tags({"encoder_uri": encoder, "method": "mae", "results": "finetune-mae-conv"})
        finetune.name_after("finetune-mae-conv")
        finetune.log_params({"encoder_uri": encoder})
        finetune.set_tags({"encoder_uri": "random:vit", "phase": "eval"})  # names nothing
    with start_run(cfg, "pretrain-mae", tmp_path) as pretrain:  # as the trainer does
        pretrain.set_tags({"encoder_uri": encoder})
        pretrain.log_params({"encoder_uri": encoder})
        pretrain.name_after(encoder)
    with start_run(cfg, "pca-poc", tmp_path) as pca:
        pca.name_after("file:///store/results/pca-poc")

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


def test_interrupted_run_is_killed(
    mlflow_server: str, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(KeyboardInterrupt):
        with start_run(_cfg(mlflow_server), "pretrain-mae", tmp_path) as tracker:
            raise KeyboardInterrupt("stopped by SIGTERM at step 3; checkpoint saved")
    run = MlflowClient(tracking_uri=mlflow_server).get_run(tracker.run_id)
    assert run.info.status == "KILLED"


# -- outages -----------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # free once closed: nothing listens there


def _fast_limits(env: pytest.MonkeyPatch, timeout_s: int = 1) -> None:
    """Tiny MLflow HTTP limits: one retry, no backoff."""
    env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    env.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))


def test_closed_port_fails_fast_at_start_with_the_default_limits(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"MLflow tracking at {uri} \(from tracking.uri\)"):
        with start_run(_cfg(uri), "pretrain-mae", tmp_path):
            pytest.fail("the block ran without a tracking server")
    # MLflow's own defaults retried for ~4 min; 3 retries with backoff 0, 2, 4 s (+ jitter)
    assert time.monotonic() - started < 15


def test_silent_server_fails_at_start_within_the_configured_timeout(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fast_limits(clean_env)
    with socket.socket() as silent:  # the kernel accepts connections; nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingError, match=f"MLflow tracking at {uri} .*timeout"):
            with start_run(_cfg(uri), "pretrain-mae", tmp_path):
                pytest.fail("the block ran without a tracking server")
        elapsed = time.monotonic() - started
    assert 1 <= elapsed < 5  # two attempts of 1 s each, not MLflow's 8 x 120 s


class Proxy:
    """A loopback TCP forwarder to a real server that can go down (its port closed) or silent
    (connections accepted, nothing forwarded) and come back on the same port."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).port
        self.port = _closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.silent = False
        self._conns: list[socket.socket] = []
        self.start()

    def start(self) -> None:
        self.silent = False
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed by stop()
                return
            self._conns.append(conn)
            if self.silent:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self._conns.append(upstream)
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        """Drop every open connection (the client's pooled keep-alive ones too)."""
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns.clear()

    def stop(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
        self._server.close()
        self.cut()

    def go_silent(self) -> None:
        self.silent = True
        self.cut()


def _outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unreachable since step" in r.getMessage()]


def test_outage_mid_run_never_raises_and_metrics_catch_up(
    mlflow_server: str, clean_env: pytest.MonkeyPatch, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    _fast_limits(clean_env)
    proxy = Proxy(mlflow_server)
    caplog.set_level(logging.WARNING, logger="hsissl.tracking")
    try:
        with start_run(_cfg(proxy.url), "pretrain-mae", tmp_path) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=1)
            proxy.stop()
            started = time.monotonic()
            tracker.log_metrics({"loss": 0.9}, step=2)  # fails: one warning
            tracker.log_metrics({"loss": 0.8}, step=3)  # waits for the next try
            tracker.set_tags({"encoder_uri": "file:///s/checkpoints/mae-x/encoder.pt"})
            tracker.log_params({"encoder_uri": "file:///s/checkpoints/mae-x/encoder.pt"})
            tracker.name_after("file:///s/checkpoints/mae-x/encoder.pt")
            tracker.log_dict({"skipped": True}, "outage.json")
            assert time.monotonic() - started < 3
            assert not tracker.reachable
            [warning] = _outage_warnings(caplog)
            assert f"MLflow at {proxy.url} unreachable since step 2" in warning
            assert "training continues, metrics are kept in history.json" in warning

            proxy.start()
            tracker._retry_at = 0.0  # the next try is due now instead of in 60 s
            tracker.log_metrics({"loss": 0.7}, step=4)
            assert tracker.reachable
    finally:
        proxy.stop()

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "pretrain-mae-x"  # the tags set during the outage arrived
    assert run.data.params["encoder_uri"] == "file:///s/checkpoints/mae-x/encoder.pt"
    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.9), (3, 0.8), (4, 0.7)]
    assert len(_outage_warnings(caplog)) == 1


def test_silent_server_mid_run_costs_one_timeout_and_the_error_still_propagates(
    mlflow_server: str, clean_env: pytest.MonkeyPatch, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    _fast_limits(clean_env)
    proxy = Proxy(mlflow_server)
    caplog.set_level(logging.WARNING, logger="hsissl.tracking")
    try:
        with pytest.raises(RuntimeError, match="boom"):  # not an MLflow error from ending the run
            with start_run(_cfg(proxy.url), "pretrain-mae", tmp_path) as tracker:
                proxy.go_silent()
                started = time.monotonic()
                tracker.log_metrics({"loss": 0.9}, step=7)  # two attempts of 1 s
                first = time.monotonic() - started
                for step in range(8, 20):  # no attempts until the next try is due
                    tracker.log_metrics({"loss": 0.8}, step=step)
                rest = time.monotonic() - started - first
                ending = time.monotonic()
                raise RuntimeError("boom")
        ended = time.monotonic() - ending  # one more try (two attempts) to mark it FAILED
    finally:
        proxy.stop()
    assert 1 <= first < 5 and rest < 0.5 and ended < 5
    [warning] = _outage_warnings(caplog)
    assert "since step 7" in warning
    assert any(f"run {tracker.run_id} at {proxy.url} could not be marked FAILED yet; what it "
               "misses is kept in" in r.getMessage() for r in caplog.records)  # fmt: skip
    kept = json.loads((tmp_path / "mlflow-outbox" / f"{tracker.run_id}.json").read_text())
    assert kept["status"] == "FAILED"  # for the next command, or `hsissl tracking sync`


def test_rejected_values_are_dropped_with_a_warning(
    mlflow_server: str, clean_env: pytest.MonkeyPatch, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, logger="hsissl.tracking")
    with start_run(_cfg(mlflow_server), "pretrain-mae", tmp_path) as tracker:
        tracker.log_params({"data.tile_size": 64})  # MLflow params are final: 32 was logged
        tracker.log_metrics({"loss": 0.5}, step=1)
    assert any("rejected params data.tile_size" in r.getMessage() for r in caplog.records)
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["data.tile_size"] == "32"
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == [0.5]
