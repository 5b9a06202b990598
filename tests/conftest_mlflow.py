"""pytest plugin: a real MLflow tracking server (sqlite backend, proxied artifacts) per session.

Register with ``pytest_plugins = ["conftest_mlflow"]`` in tests/conftest.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (its own process group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _launch(root: Path, port: int) -> subprocess.Popen:
    """Start ``mlflow server`` on ``port`` with its sqlite store and artifacts in ``root``."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    if not mlflow_bin.exists():
        pytest.skip(f"mlflow server: {mlflow_bin} not found")
    cmd = [
        str(mlflow_bin), "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--serve-artifacts", "--artifacts-destination", (root / "artifacts").as_uri(),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",  # one worker starts faster and is plenty for tests
    ]  # fmt: skip
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    with (root / "server.log").open("ab") as log:
        # own session, so teardown can kill the server's worker processes too
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
        )


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(url):
        if proc.poll() is not None:
            pytest.skip(
                f"mlflow server exited with code {proc.returncode}; log tail:\n" + _tail(log_path)
            )
        if time.monotonic() > deadline:
            pytest.skip(
                f"mlflow server on {url} not healthy after {STARTUP_TIMEOUT_S:.0f} s;"
                " log tail:\n" + _tail(log_path)
            )
        time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (``http://127.0.0.1:PORT``) of a running MLflow server; skips if it cannot start."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _launch(root, port)
    try:
        _wait_healthy(proc, url, root / "server.log")
        yield url
    finally:
        _stop(proc)


class MlflowServer:
    """An MLflow server a test may kill (SIGKILL) and start again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = _launch(self.root, self.port)
        _wait_healthy(self.proc, self.url, self.root / "server.log")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def killable_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A started :class:`MlflowServer` of this test alone."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_killable"))
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            _stop(server.proc)
