"""Stop signals during pretraining: SIGTERM (pod deletion, preemption) and Ctrl-C end the loop
at a step boundary with a checkpoint of that step, the MLflow run KILLED and exit code 130."""

from __future__ import annotations

import io
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hsissl.config import Config, load_config
from hsissl.layout import storage_of
from hsissl.pretrain.mae import MAERecipe
from hsissl.pretrain.trainer import StopSignals, pretrain
from hsissl.stages import ingest

REPO = Path(__file__).resolve().parents[1]
EXIT_INTERRUPTED = 130  # the CLI's code for KeyboardInterrupt, which a stop signal becomes


def overrides(run_dir: Path, **extra: object) -> list[str]:
    base = {
        "run_dir": run_dir, "synthetic.scenes": "{tr: 2, va: 1, ts: 1}", "synthetic.size": 128,
        "data.scene_size": 128, "pretrain.batch_size": 8, "pretrain.max_steps": 100_000,
        "pretrain.ckpt_every": 3, "pretrain.log_every": 1, "pretrain.knn_tiles": 0,
        "pretrain.loader_threads": 1, "pretrain.name": "stopped",
        "mae.model": "mae_vit_tiny_patch8_64", "tracking.uri": "",  # local sqlite store
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cfg_for(run_dir: Path, **extra: object) -> Config:
    return load_config(REPO / "configs" / "tiny.yaml", overrides(run_dir, **extra))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("interrupts") / "run"
    ingest.run(cfg_for(run_dir))
    return run_dir


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """SIGINT as an interactive Python has it, whatever this process inherited (a background
    job of a non-interactive shell, e.g. `nohup make test &`, starts with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_first_signal_requests_a_stop_and_a_second_acts_at_once(python_sigint) -> None:
    before = {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS}
    assert before[signal.SIGINT] is signal.default_int_handler
    stop = StopSignals()
    with stop.installed():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert stop.requested == "SIGTERM"
        assert {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS} == before
        with pytest.raises(KeyboardInterrupt):  # the second signal: the previous handler
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS} == before


def test_ignored_sigint_stays_ignored_and_the_tests_pass_under_it() -> None:
    """Started with SIGINT ignored (as `nohup make test &` starts it), the signal test above
    passes and the trainer leaves SIGINT ignored (SIGTERM still stops it)."""
    check = (
        "import signal; from hsissl.pretrain.trainer import StopSignals\n"
        "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "with StopSignals().installed():\n"
        "    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    for cmd in ([sys.executable, "-c", check],
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 f"{__file__}::test_first_signal_requests_a_stop_and_a_second_acts_at_once"]):  # fmt: skip
        proc = subprocess.run(cmd, preexec_fn=ignore, capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_sigterm_saves_that_step_ends_the_run_killed_and_the_rerun_resumes(
    ingested: Path, tmp_path: Path
) -> None:
    key = "checkpoints/stopped/train.pt"
    stderr_path = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "hsissl.cli", "pretrain-mae",
           "--config", str(REPO / "configs" / "tiny.yaml"), *overrides(ingested)]  # fmt: skip
    with stderr_path.open("w") as stderr:  # a file, not a pipe: tqdm could fill a pipe and block
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        deadline = time.monotonic() + 60
        while (not storage_of(cfg_for(ingested)).exists(key) and proc.poll() is None
               and time.monotonic() < deadline):  # fmt: skip
            time.sleep(0.05)
        store = storage_of(cfg_for(ingested))
        assert store.exists(key), f"no checkpoint within 60 s:\n{stderr_path.read_text()}"
        first_step = torch.load(io.BytesIO(store.get_bytes(key)), weights_only=False)["step"]
        time.sleep(1.0)  # let it run on past the first checkpoint
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = stderr_path.read_text()
    assert code == EXIT_INTERRUPTED, err
    found = re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", err)
    assert found, err
    assert "rerun the same command to resume" in err
    stopped_at = int(found.group(1))
    assert stopped_at > first_step
    saved = storage_of(cfg_for(ingested)).get_bytes(key)
    assert torch.load(io.BytesIO(saved), weights_only=False)["step"] == stopped_at
    with sqlite3.connect(ingested / "mlflow.db") as db:
        statuses = db.execute(
            "SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'stage' AND t.value = 'pretrain-mae'"
        ).fetchall()
    assert statuses == [("KILLED",)]

    resumed = pretrain(cfg_for(ingested, **{"pretrain.max_steps": stopped_at + 2}), MAERecipe,
                       "pretrain-mae")  # fmt: skip
    assert resumed["resumed"] and resumed["steps"] == stopped_at + 2
