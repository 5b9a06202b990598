"""hsissl.storage against a local directory and a real S3 server (SeaweedFS, see conftest_s3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hsissl.storage import LocalStorage, S3Storage, Storage, open_storage

BACKENDS = ["local", "s3", "s3-prefixed"]


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """An empty store of each backend; the S3 ones are fresh buckets (one with a key prefix)."""
    if request.param == "local":
        return open_storage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(bucket + ("/runs/r1" if request.param == "s3-prefixed" else ""))


@pytest.fixture
def s3_storage(s3_bucket: str) -> S3Storage:
    store = open_storage(s3_bucket + "/root")
    assert isinstance(store, S3Storage)
    return store


# ----------------------------------------------------------------------------- open_storage


def test_open_storage_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in ("rel/store", str(tmp_path / "rel" / "store"), (tmp_path / "rel/store").as_uri()):
        store = open_storage(uri)
        assert isinstance(store, LocalStorage)
        assert store.root == (tmp_path / "rel" / "store").resolve()
        assert store.uri == store.root.as_uri()
    assert open_storage("rel/store").join("a/b.txt") == (tmp_path / "rel/store/a/b.txt").as_uri()


def test_open_storage_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="gs"):
        open_storage("gs://bucket/x")


@pytest.mark.parametrize(
    "missing", ["HSISSL_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
)
def test_open_storage_s3_names_missing_env(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    env = {
        "HSISSL_S3_ENDPOINT": "http://127.0.0.1:1",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(missing)
    with pytest.raises(RuntimeError, match=missing):
        open_storage("s3://bucket/prefix")


def test_open_storage_s3_endpoint_fallback(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HSISSL_S3_ENDPOINT")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only MLFLOW_S3_ENDPOINT_URL is left
    store = open_storage("s3://hsissl-fallback/p/q")
    assert isinstance(store, S3Storage)
    assert store.uri == "s3://hsissl-fallback/p/q"
    assert store.join("x/y") == "s3://hsissl-fallback/p/q/x/y"
    assert store.client.bucket_exists("hsissl-fallback")  # created on open


# ----------------------------------------------------------------------------- basic operations


def test_bytes_and_files_round_trip(storage: Storage, tmp_path: Path) -> None:
    storage.put_bytes("a/b/c.bin", b"\x00\x01payload")
    assert storage.get_bytes("a/b/c.bin") == b"\x00\x01payload"
    storage.put_bytes("a/b/c.bin", b"v2")  # overwrite
    assert storage.get_bytes("/a//b/c.bin/") == b"v2"  # keys are normalised

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(70_000))
    storage.put_file(src, "files/src.bin")
    out = storage.get_file("files/src.bin", tmp_path / "out" / "copy.bin")
    assert out == tmp_path / "out" / "copy.bin"
    assert out.read_bytes() == src.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["copy.bin"]  # no temp file left


def test_list_exists_delete(storage: Storage) -> None:
    for key in ["ds/z.txt", "ds/a/1.txt", "ds/a/0.txt", "ds2/x.txt", "top.txt"]:
        storage.put_bytes(key, key.encode())
    assert storage.list() == ["ds/a/0.txt", "ds/a/1.txt", "ds/z.txt", "ds2/x.txt", "top.txt"]
    assert storage.list("ds") == ["ds/a/0.txt", "ds/a/1.txt", "ds/z.txt"]  # not ds2
    assert storage.list("ds/a/") == ["ds/a/0.txt", "ds/a/1.txt"]
    assert storage.list("nothing") == []
    assert storage.exists("ds/z.txt") and storage.exists("top.txt")
    assert not storage.exists("ds") and not storage.exists("ds/missing.txt")

    storage.delete_prefix("ds")
    assert storage.list() == ["ds2/x.txt", "top.txt"]
    storage.delete_prefix("top.txt")  # a prefix that is itself a key
    assert storage.list() == ["ds2/x.txt"]
    storage.delete_prefix("not/there")  # no-op
    with pytest.raises(ValueError, match="non-empty"):
        storage.delete_prefix("")  # never wipe the whole store by accident


def test_missing_key_errors_name_the_uri(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope/missing.bin"):
        storage.get_bytes("nope/missing.bin")
    with pytest.raises(FileNotFoundError, match="nope/missing.bin"):
        storage.get_file("nope/missing.bin", tmp_path / "dst.bin")
    assert not (tmp_path / "dst.bin").exists()
    with pytest.raises(FileNotFoundError, match="nope/missing.bin"):
        storage.open_local("nope/missing.bin", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"\.\."):
        storage.get_bytes("../escape")


def test_local_path_and_open_local(storage: Storage, tmp_path: Path) -> None:
    storage.put_bytes("d/data.npy", b"0123456789")
    if isinstance(storage, LocalStorage):
        assert storage.local_path("d/data.npy") == storage.root / "d" / "data.npy"
        assert storage.open_local("d/data.npy") == storage.root / "d" / "data.npy"
    else:
        assert storage.local_path("d/data.npy") is None


# ----------------------------------------------------------------------------- transactions


def _write_dataset(tx, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        tx.path(key).write_bytes(data)
        tx.done(key)


def test_transaction_commit_publishes_everything(storage: Storage) -> None:
    files = {"scenes/0.bin": b"s0", "scenes/1.bin": b"s1", "labels/0.bin": b"l0"}
    with storage.transaction("ds") as tx:
        _write_dataset(tx, files)
        tx.put_bytes("stats.json", b"{}")
        assert not storage.exists("ds/manifest.json")  # the marker only comes with commit
        tx.commit({"manifest.json": b'{"ok": true}'})
    expected = sorted(["ds/manifest.json", "ds/stats.json", *(f"ds/{k}" for k in files)])
    assert storage.list("ds") == expected
    assert storage.get_bytes("ds/scenes/1.bin") == b"s1"
    assert storage.get_bytes("ds/manifest.json") == b'{"ok": true}'
    assert storage.list() == expected  # no staging leftovers anywhere (local: no .partial dir)


def test_transaction_exception_leaves_nothing(storage: Storage) -> None:
    with pytest.raises(KeyError, match="boom"), storage.transaction("ds") as tx:
        _write_dataset(tx, {"a.bin": b"a", "sub/b.bin": b"b"})
        tx.put_bytes("c.json", b"{}")
        raise KeyError("boom")
    assert storage.list("ds") == []
    assert storage.list() == []  # local: neither ds/ nor ds.partial-*/
    if isinstance(storage, LocalStorage):
        assert not storage.root.exists() or list(storage.root.iterdir()) == []


def test_transaction_without_commit_aborts(storage: Storage) -> None:
    with storage.transaction("ckpt") as tx:
        _write_dataset(tx, {"w.pt": b"weights"})
    assert storage.list() == []


def test_transaction_requires_done(storage: Storage) -> None:
    with pytest.raises(RuntimeError, match="done"), storage.transaction("ds") as tx:
        tx.path("forgotten.bin").write_bytes(b"x")
        tx.commit({"manifest.json": b"{}"})
    assert storage.list() == []
    with pytest.raises(FileNotFoundError, match="never.bin"), storage.transaction("ds") as tx:
        tx.done("never.bin")


def test_commit_replaces_existing_prefix(storage: Storage) -> None:
    with storage.transaction("ds") as tx:
        _write_dataset(tx, {"old-only.bin": b"old", "shared.bin": b"old"})
        tx.commit({"manifest.json": b"v1"})
    storage.put_bytes("ds-sibling/keep.bin", b"keep")
    with storage.transaction("ds") as tx:
        _write_dataset(tx, {"shared.bin": b"new", "new-only.bin": b"new"})
        tx.commit({"manifest.json": b"v2"})
    assert storage.list("ds") == ["ds/manifest.json", "ds/new-only.bin", "ds/shared.bin"]
    assert storage.get_bytes("ds/shared.bin") == b"new"
    assert storage.get_bytes("ds/manifest.json") == b"v2"
    assert storage.list() == [  # nothing else touched, no .old/.partial leftovers
        "ds-sibling/keep.bin",
        "ds/manifest.json",
        "ds/new-only.bin",
        "ds/shared.bin",
    ]


def test_local_failed_rewrite_keeps_old_version(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    with store.transaction("ds") as tx:
        tx.commit({"manifest.json": b"v1"})
    with pytest.raises(OSError), store.transaction("ds") as tx:
        tx.put_bytes("half.bin", b"x")
        raise OSError("disk full")
    assert store.list() == ["ds/manifest.json"]  # the published version is untouched


def test_local_transaction_removes_stale_partial_dirs(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    stale = store.root / "ds.partial-deadbeef"  # what a killed run leaves behind
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "x.bin").write_bytes(b"stale")
    with store.transaction("ds") as tx:
        tx.put_bytes("y.bin", b"fresh")
        tx.commit({"manifest.json": b"{}"})
    assert not stale.exists()
    assert store.list() == ["ds/manifest.json", "ds/y.bin"]


# ----------------------------------------------------------------------------- S3 specifics

KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from hsissl.storage import open_storage

    store = open_storage(sys.argv[1])
    with store.transaction("ds") as tx:
        for i in range(3):
            tx.path(f"part/{i}.bin").write_bytes(b"x" * 1000)
            tx.done(f"part/{i}.bin")
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # dies before commit: no cleanup runs
        tx.commit({"manifest.json": b"{}"})
    """
)


def test_s3_killed_writer_leaves_no_manifest(s3_storage: S3Storage, tmp_path: Path) -> None:
    s3_storage.put_bytes("ds/stale-from-older-version.bin", b"old")
    s3_storage.put_bytes("ds/manifest.json", b"old")
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, s3_storage.uri],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # its orphaned temp dir stays in tmp_path
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "written" in proc.stdout
    left = s3_storage.list("ds")
    assert left == ["ds/part/0.bin", "ds/part/1.bin", "ds/part/2.bin"]  # incomplete, unmarked
    assert "ds/manifest.json" not in left

    with s3_storage.transaction("ds") as tx:
        tx.put_bytes("fresh.bin", b"new")
        tx.commit({"manifest.json": b"{}"})
    assert s3_storage.list() == ["ds/fresh.bin", "ds/manifest.json"]


def test_s3_transaction_removes_local_temp_files(s3_storage: S3Storage) -> None:
    with s3_storage.transaction("ds") as tx:
        local = tx.path("big/file.bin")
        local.write_bytes(b"abc")
        tx.done("big/file.bin")
        assert not local.exists()  # uploaded, then removed
        tmpdir = tx.tmpdir
        assert tmpdir is not None and tmpdir.is_dir()
        tx.commit({"manifest.json": b"{}"})
    assert not tmpdir.exists()
    with pytest.raises(RuntimeError), s3_storage.transaction("ds2") as tx:
        tmpdir = tx.tmpdir
        tx.path("x.bin").write_bytes(b"x")
        raise RuntimeError("stop")
    assert not tmpdir.exists()


def test_s3_open_local_downloads_and_reuses(s3_storage: S3Storage, tmp_path: Path) -> None:
    payload = os.urandom(100_000)
    s3_storage.put_bytes("ds/scene.bin", payload)
    cache = tmp_path / "cache"
    first = s3_storage.open_local("ds/scene.bin", cache_dir=cache)
    assert first == cache / s3_storage.bucket / "root" / "ds" / "scene.bin"
    assert first.read_bytes() == payload
    mtime = first.stat().st_mtime_ns
    assert s3_storage.open_local("ds/scene.bin", cache_dir=cache) == first
    assert first.stat().st_mtime_ns == mtime  # reused, not downloaded again

    first.write_bytes(b"truncated")  # a size mismatch forces a fresh download
    assert s3_storage.open_local("ds/scene.bin", cache_dir=cache).read_bytes() == payload


def test_s3_open_local_default_cache_from_env(
    s3_storage: S3Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HSISSL_CACHE", str(tmp_path / "envcache"))
    s3_storage.put_bytes("k.bin", b"kk")
    path = s3_storage.open_local("k.bin")
    assert path == tmp_path / "envcache" / s3_storage.bucket / "root" / "k.bin"
    assert path.read_bytes() == b"kk"


def test_s3_multipart_file_round_trip(s3_storage: S3Storage, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))  # > minio's 5 MiB part size: multipart upload
    with s3_storage.transaction("ckpt") as tx:
        tx.put_bytes("small.json", b"{}")
        local = tx.path("weights.pt")
        local.write_bytes(big.read_bytes())
        tx.done("weights.pt")
        tx.commit({"manifest.json": b"{}"})
    assert s3_storage.get_file("ckpt/weights.pt", tmp_path / "back.bin").read_bytes() == (
        big.read_bytes()
    )
