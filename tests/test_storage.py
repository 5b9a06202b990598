"""hsissl.storage against a local directory and a real S3 server (SeaweedFS, see conftest_s3)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hsissl.storage import LocalStorage, S3Storage, Storage, StorageError, open_storage

BACKENDS = ["local", "s3", "s3-prefixed"]


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """An empty store of each backend; the S3 ones are fresh buckets (one with a key prefix)."""
    if request.param == "local":
        return open_storage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket").removeprefix("s3://")
    return S3Storage(
        bucket, "runs/r1" if request.param == "s3-prefixed" else "", create_bucket=True
    )


@pytest.fixture
def s3_storage(s3_bucket: str) -> S3Storage:
    return S3Storage(s3_bucket.removeprefix("s3://"), "root", create_bucket=True)


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
    with pytest.raises(StorageError, match=missing):
        open_storage("s3://bucket/prefix")


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("HSISSL_S3_ENDPOINT", "ftp://host:21", "expected http(s)://host[:port]"),
        ("HSISSL_S3_TIMEOUT", "soon", "expected a positive number of seconds"),
        ("HSISSL_S3_CONNECT_TIMEOUT", "0", "expected a positive number of seconds"),
        ("HSISSL_S3_RETRIES", "-1", "expected an integer >= 0"),
    ],
)
def test_open_storage_s3_rejects_bad_settings(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, expected: str
) -> None:
    for name, good in {"HSISSL_S3_ENDPOINT": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "k",
                       "AWS_SECRET_ACCESS_KEY": "s"}.items():  # fmt: skip
        monkeypatch.setenv(name, good)
    monkeypatch.setenv(var, value)
    with pytest.raises(StorageError, match=re.escape(f"{var}={value!r}: {expected}")):
        open_storage("s3://bucket/prefix")


def test_open_storage_rejects_s3_uri_without_bucket() -> None:
    with pytest.raises(StorageError, match=re.escape("'s3:///key': expected s3://bucket")):
        open_storage("s3:///key")


def test_open_storage_s3_endpoint_fallback(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HSISSL_S3_ENDPOINT")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only MLFLOW_S3_ENDPOINT_URL is left
    store = open_storage("s3://hsissl-fallback/p/q")
    with store.transaction("init") as tx:  # creates the bucket (see the bucket test below)
        tx.commit({"manifest.json": b"{}"})
    assert isinstance(store, S3Storage)
    assert store.uri == "s3://hsissl-fallback/p/q"
    assert store.join("x/y") == "s3://hsissl-fallback/p/q/x/y"
    store.put_bytes("x/y", b"xy")  # a request to the MLFLOW_S3_ENDPOINT_URL server
    assert store.get_bytes("x/y") == b"xy"


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


def _snapshot(storage: Storage, prefix: str = "") -> dict[str, bytes]:
    return {key: storage.get_bytes(key) for key in storage.list(prefix)}


def _commit_v1(storage: Storage) -> dict[str, bytes]:
    """A committed dataset-like folder ``ds``; returns its content."""
    with storage.transaction("ds") as tx:
        _write_dataset(tx, {"tr/images-0.npy": b"old0", "tr/images-1.npy": b"old1"})
        tx.put_bytes("stats.json", b"v1")
        tx.commit({"manifest.json": b"v1"})
    return _snapshot(storage)


def test_failed_rewrite_keeps_committed_version(storage: Storage) -> None:
    committed = _commit_v1(storage)
    with pytest.raises(OSError, match="disk full"), storage.transaction("ds") as tx:
        _write_dataset(tx, {"tr/images-0.npy": b"new0", "tr/images-9.npy": b"new9"})
        tx.put_bytes("stats.json", b"v2")
        assert _snapshot(storage, "ds") == committed  # readers still see v1 meanwhile
        raise OSError("disk full")
    assert _snapshot(storage) == committed  # byte-identical, no staging left anywhere
    with storage.transaction("ds") as tx:  # left without commit()
        _write_dataset(tx, {"tr/images-0.npy": b"new0"})
    assert _snapshot(storage) == committed


def test_commit_keeps_the_last_versions_and_readers_keep_theirs(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions live under ds/_v/<id>/; the pointer names the current one; HSISSL_KEEP_VERSIONS
    (default 2) versions stay, so a reader that resolved the previous pointer still reads it."""
    committed = _commit_v1(storage)
    reader = (
        open_storage(storage.uri)
        if not isinstance(storage, S3Storage)
        else S3Storage(
            storage.bucket, storage.prefix, client=storage.client, endpoint=storage.endpoint
        )
    )
    assert reader.get_bytes("ds/manifest.json") == b"v1"  # resolves (and keeps) the pointer
    for n in (2, 3):
        with storage.transaction("ds") as tx:
            tx.put_bytes("tr/images-0.npy", f"v{n}".encode())
            tx.commit({"manifest.json": f"v{n}".encode()})
        assert storage.get_bytes("ds/manifest.json") == f"v{n}".encode()
        assert storage.list("ds") == ["ds/manifest.json", "ds/tr/images-0.npy"]
        versions = {k.split("/")[2] for k in storage._list("ds") if k.startswith("ds/_v/")}
        assert len(versions) == 2, versions  # the new one and the one before
        if n == 2:  # the reader's version is the previous one: still there, still whole
            assert _snapshot(reader, "ds") == committed
    monkeypatch.setenv("HSISSL_KEEP_VERSIONS", "1")
    with storage.transaction("ds") as tx:
        tx.commit({"manifest.json": b"v4"})
    assert {k.split("/")[2] for k in storage._list("ds") if k.startswith("ds/_v/")} == {
        storage.pointer("ds")["version"]
    }
    assert sorted(storage._list("ds")) == sorted(
        ["ds/_current.json", f"ds/_v/{storage.pointer('ds')['version']}/manifest.json"]
    )  # no lease left behind


def test_crash_at_the_commit_point_keeps_the_old_version(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything of the new version is written, the pointer write fails: v1 stays current."""
    committed = _commit_v1(storage)
    real_put = type(storage).put_bytes

    def failing_put(self, key, data):
        if key.endswith("_current.json"):
            raise StorageError("simulated crash at the pointer write")
        return real_put(self, key, data)

    monkeypatch.setattr(type(storage), "put_bytes", failing_put)
    with pytest.raises(StorageError, match="simulated"), storage.transaction("ds") as tx:
        _write_dataset(tx, {"tr/images-0.npy": b"new0", "tr/images-7.npy": b"new7"})
        tx.commit({"manifest.json": b"v2"})
    monkeypatch.setattr(type(storage), "put_bytes", real_put)
    assert _snapshot(open_storage(storage.uri) if isinstance(storage, LocalStorage)
                     else storage, "ds") == committed  # fmt: skip
    with storage.transaction("ds") as tx:  # the lease went with the failed writer
        tx.commit({"manifest.json": b"v2"})
    assert storage.list("ds") == ["ds/manifest.json"]


def test_carry_keeps_files_not_rewritten(storage: Storage) -> None:
    with storage.transaction("ckpt") as tx:
        tx.put_bytes("encoder.pt", b"enc1")
        tx.commit({"train.pt": b"t1"})
    with storage.transaction("ckpt", carry=True) as tx:
        tx.commit({"train.pt": b"t2"})
    assert _snapshot(storage, "ckpt") == {"ckpt/encoder.pt": b"enc1", "ckpt/train.pt": b"t2"}
    with storage.transaction("ckpt") as tx:  # without carry: only what this version wrote
        tx.commit({"train.pt": b"t3"})
    assert _snapshot(storage, "ckpt") == {"ckpt/train.pt": b"t3"}


def test_plain_folder_of_the_old_layout_is_read_then_replaced(storage: Storage) -> None:
    storage.put_bytes("ds/manifest.json", b"old-layout")
    storage.put_bytes("ds/tr/images-0.npy", b"old0")
    assert storage.get_bytes("ds/manifest.json") == b"old-layout"
    with storage.transaction("ds") as tx:
        tx.commit({"manifest.json": b"v2"})
    assert _snapshot(storage) == {"ds/manifest.json": b"v2"}
    assert not any(k.startswith("ds/tr/") for k in storage._list("ds"))  # removed after commit


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from hsissl.storage import open_storage

    store = open_storage(sys.argv[1])
    with store.transaction("ds") as tx:
        for i in range(3):
            tx.path(f"tr/images-{i}.npy").write_bytes(b"x" * 1000)
            tx.done(f"tr/images-{i}.npy")
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # dies before commit: no cleanup runs
        tx.commit({"manifest.json": b"{}"})
    """
)


def test_killed_writer_keeps_committed_version(storage: Storage, tmp_path: Path) -> None:
    committed = _commit_v1(storage)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, storage.uri],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # its orphaned temp dir stays in tmp_path
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "written" in proc.stdout
    assert _snapshot(storage, "ds") == committed  # the committed version is untouched
    assert _snapshot(storage) == committed  # its unfinished version and lease are not listed
    current = storage.pointer("ds")["version"]
    orphans = {k.split("/")[2] for k in storage._list("ds/_v")} - {current}
    assert len(orphans) == 1, orphans  # what the killed writer staged
    assert storage._exists("ds/_lease.json")  # its lease too (its pid is gone: stale)

    with storage.transaction("ds") as tx:  # the next writer takes over and cleans up
        tx.put_bytes("fresh.bin", b"new")
        tx.commit({"manifest.json": b"v2"})
    assert storage.list() == ["ds/fresh.bin", "ds/manifest.json"]
    assert storage.get_bytes("ds/manifest.json") == b"v2"
    versions = {k.split("/")[2] for k in storage._list("ds/_v")}
    assert versions == {current, storage.pointer("ds")["version"]}  # the orphan is gone
    assert not storage._exists("ds/_lease.json")


# ----------------------------------------------------------------------------- S3 specifics


def test_s3_bucket_is_created_only_by_a_transaction(
    s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    store = open_storage(s3_bucket + "/p")
    assert isinstance(store, S3Storage)
    missing = f"{s3_bucket}: no such bucket at {s3_server.endpoint}; create it"
    (tmp_path / "f").write_bytes(b"f")
    assert not store.exists("k")  # a missing bucket holds no keys (ingest's reuse check)
    for read_or_write in (
        lambda: store.get_bytes("k"),
        lambda: store.get_file("k", tmp_path / "k"),
        lambda: store.list(),
        lambda: store.put_bytes("k", b"x"),  # SeaweedFS would create the bucket on this PUT
        lambda: store.put_file(tmp_path / "f", "k"),
    ):
        with pytest.raises(StorageError, match=re.escape(missing)):
            read_or_write()
    assert not store.client.bucket_exists(store.bucket)
    with store.transaction("ds") as tx:
        tx.commit({"manifest.json": b"{}"})
    assert store.client.bucket_exists(store.bucket)
    assert store.list() == ["ds/manifest.json"]


@pytest.mark.parametrize("var", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_s3_wrong_credentials_name_the_endpoint(
    s3_server, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    with s3_storage.transaction("ds") as tx:  # creates the bucket with the right credentials
        tx.commit({"k": b"k"})
    monkeypatch.setenv(var, "wrong-" + os.environ[var])
    bad = open_storage(s3_storage.uri)
    for call in (lambda: bad.get_bytes("ds/k"), lambda: bad.exists("ds/k"), lambda: bad.list()):
        with pytest.raises(StorageError, match=re.escape(s3_server.endpoint)) as info:
            call()
        assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in str(info.value)


def test_s3_unresponsive_endpoint_fails_within_the_timeouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # the kernel accepts connections; nobody ever answers
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        env = {"HSISSL_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "k",
               "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1",
               "HSISSL_S3_CONNECT_TIMEOUT": "0.5", "HSISSL_S3_TIMEOUT": "0.5",
               "HSISSL_S3_RETRIES": "1"}  # fmt: skip
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        store = open_storage("s3://bucket/p")
        start = time.monotonic()
        with pytest.raises(StorageError, match=re.escape(endpoint)) as info:
            store.exists("k")
        seconds = time.monotonic() - start
    assert 0.9 < seconds < 10, seconds  # two 0.5 s reads, not minio's default 6 x 300 s
    assert "HSISSL_S3_TIMEOUT=0.5s" in str(info.value)
    assert "HSISSL_S3_RETRIES=1" in str(info.value)


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


def test_s3_open_local_refreshes_a_same_size_overwrite(
    s3_storage: S3Storage, tmp_path: Path
) -> None:
    """Shard sizes are fixed by their shape: after a re-ingest only the ETag tells."""
    old, new = os.urandom(50_000), os.urandom(50_000)
    cache = tmp_path / "cache"
    s3_storage.put_bytes("ds/shard.npy", old)
    assert s3_storage.open_local("ds/shard.npy", cache_dir=cache).read_bytes() == old
    s3_storage.put_bytes("ds/shard.npy", new)
    assert s3_storage.open_local("ds/shard.npy", cache_dir=cache).read_bytes() == new
    with s3_storage.transaction("ds") as tx:  # a re-ingest publishes by server-side copy
        tx.put_bytes("shard.npy", old)
        tx.commit({"manifest.json": b"{}"})
    assert s3_storage.open_local("ds/shard.npy", cache_dir=cache).read_bytes() == old


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


# ----------------------------------------------------------------------------- leases


@pytest.mark.parametrize("conditional", ["1", "0"])
def test_conditional_create_and_replace(
    storage: Storage, monkeypatch: pytest.MonkeyPatch, conditional: str
) -> None:
    """What leases rely on. SeaweedFS 4.48 answers a PUT with ``If-None-Match: *`` on an
    existing key, and one with a stale ``If-Match`` ETag, with 412 PreconditionFailed (as AWS S3
    and MinIO do); ``HSISSL_S3_CONDITIONAL_WRITES=0`` is the write-pause-verify fallback."""
    monkeypatch.setenv("HSISSL_S3_CONDITIONAL_WRITES", conditional)
    if isinstance(storage, S3Storage):
        storage = S3Storage(storage.bucket, storage.prefix, client=storage.client,
                            endpoint=storage.endpoint)  # fmt: skip
    elif conditional == "0":
        pytest.skip("a folder has no fallback: link() and flock() are always there")
    tag = storage.put_if_absent("x/lease", b"one")
    assert tag is not None
    assert storage.put_if_absent("x/lease", b"two") is None
    assert storage.get_tagged("x/lease") == (b"one", tag)
    new = storage.put_if_tag("x/lease", b"three", tag)
    assert new is not None and new != tag
    assert storage.put_if_tag("x/lease", b"four", tag) is None  # the old tag no longer matches
    assert storage.get_bytes("x/lease") == b"three"


def test_racing_lease_takers_get_exactly_one(storage: Storage) -> None:
    """8 threads take the lease of one folder at once: one holds it, 7 hear who does."""
    import threading

    from hsissl.storage import Lease, LeaseHeld

    barrier, won, refused = threading.Barrier(8), [], []

    def take() -> None:
        lease = Lease(storage, "datasets/ds")
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7, (won, refused)
    assert all("another ingest of 'ds' is running (owner " in r for r in refused)
    won[0].release()
    assert not storage._exists("datasets/ds/_lease.json")
