"""One small storage interface over a local directory or an S3 bucket (minio SDK).

Keys are '/'-separated strings relative to the store root. ``list``/``delete_prefix`` treat a
prefix as a folder: ``"ds"`` covers ``"ds"`` and ``"ds/..."`` but not ``"ds2/..."``.

A :class:`Transaction` writes a whole folder (dataset, checkpoint) all-or-nothing: readers see
either the old folder or the complete new one, and a folder is complete exactly when its commit
marker (e.g. ``manifest.json``, written last by :meth:`Transaction.commit`) exists. Commit
markers belong at the top level of the transaction's prefix.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import urlparse
from urllib.request import url2pathname

if TYPE_CHECKING:
    from minio import Minio
    from minio.error import S3Error

ENDPOINT_VARS = ("HSISSL_S3_ENDPOINT", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"}


def _clean(key: str, *, allow_empty: bool = False) -> str:
    """Normalise a key ('a//b/' -> 'a/b'); refuse '.'/'..' so a key never leaves the root."""
    parts = [p for p in str(key).split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"storage key {key!r}: '.' and '..' components are not allowed")
    if not parts and not allow_empty:
        raise ValueError(f"storage key {key!r}: expected a non-empty key")
    return "/".join(parts)


def _under(key: str, prefix: str) -> bool:
    """Folder semantics: ``key`` is ``prefix`` itself or inside it."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` via a temp file in dst's folder, so dst is never half-written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


class Storage(ABC):
    """Root of a key/value file store; see the module docstring for key and prefix rules."""

    uri: str

    def join(self, key: str) -> str:
        """Full URI of ``key``."""
        key = _clean(key, allow_empty=True)
        return f"{self.uri}/{key}" if key else self.uri

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` atomically."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read ``key``; FileNotFoundError naming the URI when it is missing."""

    @abstractmethod
    def put_file(self, local: Path, key: str) -> None:
        """Upload/copy the local file to ``key`` atomically."""

    @abstractmethod
    def get_file(self, key: str, local: Path) -> Path:
        """Download/copy ``key`` to ``local`` (atomically on the local side); returns ``local``."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` is an object/file (folders are not keys)."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted, relative to the root."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under ``prefix`` and ``prefix`` itself as a key."""

    @abstractmethod
    def local_path(self, key: str) -> Path | None:
        """The real local path of ``key`` (callers may memmap it), or None for remote stores."""

    @abstractmethod
    def open_local(self, key: str, cache_dir: Path | None = None) -> Path:
        """A readable local file with the content of ``key`` (downloaded to a cache if remote)."""

    @abstractmethod
    def transaction(self, prefix: str) -> Transaction:
        """An all-or-nothing writer for the folder ``prefix``; use it as a context manager."""


class Transaction(ABC):
    """Context manager that publishes a folder only on :meth:`commit`; aborts on anything else.

    ``path(key)`` gives a local file to write, ``done(key)`` says it is complete. Leaving the
    ``with`` block by an exception, or without ``commit()``, deletes everything written; the
    exception always propagates.
    """

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = _clean(prefix)
        self._state = "new"  # new -> open -> committed | aborted
        self._pending: dict[str, Path] = {}  # keys handed out by path() and not yet done()

    def __enter__(self) -> Transaction:
        if self._state != "new":
            raise RuntimeError(f"transaction on {self.storage.join(self.prefix)} already used")
        self._begin()
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._state == "open":
            self._state = "aborted"
            self._abort()
        return False  # never swallow the exception

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(
                f"transaction on {self.storage.join(self.prefix)} is {self._state}; "
                "use it inside a `with` block and before commit()"
            )

    def path(self, key: str) -> Path:
        """Local path where the caller writes the content of ``key`` (parent folders made)."""
        self._check_open()
        key = _clean(key)
        local = self._local(key)
        local.parent.mkdir(parents=True, exist_ok=True)
        self._pending[key] = local
        return local

    def done(self, key: str) -> None:
        """Declare the file at ``path(key)`` complete (S3 uploads it now)."""
        self._check_open()
        key = _clean(key)
        local = self._local(key)
        if not local.is_file():
            raise FileNotFoundError(
                f"{self.storage.join(self.prefix + '/' + key)}: done() called but {local} "
                "was not written"
            )
        self._done(key, local)
        self._pending.pop(key, None)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write a small object into the transaction."""
        self._check_open()
        local = self.path(key)
        local.write_bytes(data)
        self.done(key)

    def commit(self, final: dict[str, bytes]) -> None:
        """Write ``final`` (the commit marker(s), e.g. manifest.json) last, then publish."""
        self._check_open()
        forgotten = sorted(k for k, p in self._pending.items() if p.exists())
        if forgotten:
            raise RuntimeError(
                f"transaction on {self.storage.join(self.prefix)}: files written via path() but "
                f"never marked done(): {forgotten}"
            )
        for key, data in final.items():
            self.put_bytes(key, data)
        self._publish()
        self._state = "committed"

    @abstractmethod
    def _local(self, key: str) -> Path: ...

    @abstractmethod
    def _begin(self) -> None: ...

    @abstractmethod
    def _done(self, key: str, local: Path) -> None: ...

    @abstractmethod
    def _publish(self) -> None: ...

    @abstractmethod
    def _abort(self) -> None: ...


# ----------------------------------------------------------------------------- local directory


class LocalStorage(Storage):
    """A directory on the local file system."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str, *, allow_empty: bool = False) -> Path:
        key = _clean(key, allow_empty=allow_empty)
        return self.root / key if key else self.root

    def join(self, key: str) -> str:
        return self._path(key, allow_empty=True).as_uri()  # percent-encoded like self.uri

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def put_file(self, local: Path, key: str) -> None:
        _atomic_copy(Path(local), self._path(key))

    def get_file(self, key: str, local: Path) -> Path:
        local = Path(local)
        _atomic_copy(self._existing(key), local)
        return local

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix, allow_empty=True)
        if base.is_file():
            return [_clean(prefix)]
        if not base.is_dir():
            return []
        keys = [p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file()]
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)  # an empty prefix (the whole store) is refused here
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def open_local(self, key: str, cache_dir: Path | None = None) -> Path:
        return self._existing(key)

    def transaction(self, prefix: str) -> Transaction:
        return LocalTransaction(self, prefix)

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.join(key)}: no such file")
        return path


class LocalTransaction(Transaction):
    """Stages into ``<root>/<prefix>.partial-<uuid>/``, then renames it to ``<root>/<prefix>``."""

    storage: LocalStorage

    def __init__(self, storage: LocalStorage, prefix: str) -> None:
        super().__init__(storage, prefix)
        self.target = storage.root / self.prefix
        self.staging = self.target.with_name(f"{self.target.name}.partial-{uuid.uuid4().hex}")

    def _local(self, key: str) -> Path:
        return self.staging / key

    def _begin(self) -> None:
        # A killed earlier run leaves its staging dir behind; nobody can finish it.
        for stale in self.target.parent.glob(f"{self.target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.staging.mkdir(parents=True)

    def _done(self, key: str, local: Path) -> None:
        pass  # the file is already in the staging dir

    def _publish(self) -> None:
        old = None
        if self.target.exists():
            old = self.target.with_name(f"{self.target.name}.old-{uuid.uuid4().hex}")
            os.rename(self.target, old)
        try:
            os.rename(self.staging, self.target)
        except BaseException:
            if old is not None:
                os.rename(old, self.target)  # put the previous version back
            raise
        if old is not None and old.is_dir():
            shutil.rmtree(old)
        elif old is not None:
            old.unlink()

    def _abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


# ----------------------------------------------------------------------------- S3 (minio SDK)


def _minio() -> ModuleType:
    """The minio SDK, imported on first S3 use: local stores work on machines without it."""
    try:
        import minio
        import minio.deleteobjects
        import minio.error
    except ImportError as exc:
        raise ImportError(
            f"s3:// storage needs the 'minio' package, which failed to import ({exc}); install "
            "it with `pip install minio`, or use a local path as the store"
        ) from exc
    return minio


def s3_client_from_env() -> Minio:
    """A minio client from HSISSL_S3_ENDPOINT | AWS_ENDPOINT_URL | MLFLOW_S3_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optional AWS_REGION."""
    endpoint = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)
    if not endpoint:
        raise RuntimeError(
            f"S3 endpoint not configured: set {ENDPOINT_VARS[0]} "
            f"(or {' / '.join(ENDPOINT_VARS[1:])}), e.g. http://127.0.0.1:8333"
        )
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not os.environ.get(var):
            raise RuntimeError(
                f"S3 credentials not configured: environment variable {var} is unset"
            )
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"S3 endpoint {endpoint!r}: expected http(s)://host[:port]")
    return _minio().Minio(
        parsed.netloc,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        secure=parsed.scheme == "https",
        region=os.environ.get("AWS_REGION") or None,
    )


def _default_cache_dir() -> Path:
    return Path(os.environ.get("HSISSL_CACHE") or Path.home() / ".cache" / "hsissl")


class S3Storage(Storage):
    """``s3://bucket/optional/prefix``; objects are named ``<prefix>/<key>``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Minio | None = None,
        create_bucket: bool = True,
    ) -> None:
        self.bucket = bucket
        self.prefix = _clean(prefix, allow_empty=True)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.S3Error: type[S3Error] = _minio().error.S3Error  # what the client raises
        self.client = client or s3_client_from_env()
        if create_bucket and not self.client.bucket_exists(bucket):
            try:
                self.client.make_bucket(bucket)
            except self.S3Error as err:  # another process may have created it meanwhile
                if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _name(self, key: str, *, allow_empty: bool = False) -> str:
        key = _clean(key, allow_empty=allow_empty)
        return "/".join(p for p in (self.prefix, key) if p)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            response = self.client.get_object(self.bucket, self._name(key))
        except self.S3Error as err:
            raise self._not_found(key, err) from err
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def put_file(self, local: Path, key: str) -> None:
        self.client.fput_object(self.bucket, self._name(key), str(local))  # multipart if large

    def get_file(self, key: str, local: Path) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.client.fget_object(self.bucket, self._name(key), str(tmp))
            os.replace(tmp, local)
        except self.S3Error as err:
            raise self._not_found(key, err) from err
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def exists(self, key: str) -> bool:
        try:
            stat = self.client.stat_object(self.bucket, self._name(key))
        except self.S3Error as err:
            if err.code in _MISSING_CODES:
                return False
            raise
        return not stat.is_dir

    def list(self, prefix: str = "") -> list[str]:
        rel = _clean(prefix, allow_empty=True)
        name = self._name(rel, allow_empty=True)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        for obj in self.client.list_objects(self.bucket, prefix=name or None, recursive=True):
            if obj.is_dir or obj.object_name.endswith("/"):
                continue  # folder markers some servers report
            key = obj.object_name[strip:]
            if _under(key, rel):
                keys.append(key)
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        self._delete(self.list(_clean(prefix)))

    def _delete(self, keys: list[str]) -> None:
        if not keys:
            return
        objects = [_minio().deleteobjects.DeleteObject(self._name(k)) for k in keys]
        errors = list(self.client.remove_objects(self.bucket, objects))  # lazy: must iterate
        if errors:
            raise OSError(f"{self.uri}: failed to delete {len(errors)} object(s): {errors[:3]}")

    def local_path(self, key: str) -> None:
        return None

    def open_local(self, key: str, cache_dir: Path | None = None) -> Path:
        name = self._name(key)
        local = Path(cache_dir or _default_cache_dir()) / self.bucket / name
        try:
            size = self.client.stat_object(self.bucket, name).size
        except self.S3Error as err:
            raise self._not_found(key, err) from err
        if local.is_file() and local.stat().st_size == size:
            return local  # cached copy of the same size: reuse
        return self.get_file(key, local)

    def transaction(self, prefix: str) -> Transaction:
        return S3Transaction(self, prefix)

    def _not_found(self, key: str, err: S3Error) -> Exception:
        if err.code in _MISSING_CODES:
            return FileNotFoundError(f"{self.join(key)}: no such object ({err.code})")
        return err


class S3Transaction(Transaction):
    """Uploads straight under ``<prefix>/``; the ``final`` objects of commit() mark it complete.

    Begin and abort delete whatever is under the prefix, top-level objects (the commit markers)
    first, so a crash mid-delete never leaves a marker over partial content.
    """

    storage: S3Storage

    def __init__(self, storage: S3Storage, prefix: str) -> None:
        super().__init__(storage, prefix)
        self.tmpdir: Path | None = None

    def _local(self, key: str) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / key

    def _clear_prefix(self) -> None:
        keys = self.storage.list(self.prefix)
        depth = self.prefix.count("/") + 1
        top = [k for k in keys if k.count("/") <= depth]  # prefix itself and prefix/<name>
        self.storage._delete(top)
        self.storage._delete([k for k in keys if k.count("/") > depth])

    def _begin(self) -> None:
        self._clear_prefix()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="hsissl-tx-"))

    def _done(self, key: str, local: Path) -> None:
        self.storage.put_file(local, f"{self.prefix}/{key}")
        local.unlink()

    def _publish(self) -> None:
        self._cleanup_tmp()

    def _abort(self) -> None:
        try:
            self._clear_prefix()
        finally:
            self._cleanup_tmp()

    def _cleanup_tmp(self) -> None:
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


# ----------------------------------------------------------------------------- factory


def open_storage(uri: str | Path) -> Storage:
    """``path``, ``/abs/path``, ``file:///abs`` -> LocalStorage; ``s3://bucket[/prefix]`` -> S3."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage URI {uri!r}: expected s3://bucket[/prefix]")
        return S3Storage(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"storage URI {uri!r}: expected file:///absolute/path")
        return LocalStorage(url2pathname(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # plain path (or a Windows drive letter)
        return LocalStorage(Path(uri).absolute())
    raise ValueError(f"storage URI {uri!r}: unsupported scheme {parsed.scheme!r} (file, s3)")
