"""An S3 bucket as a store (minio SDK, imported on first use), with bounded timeouts."""

from __future__ import annotations

import io
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from hsissl.storage.base import Storage, StorageError, _clean, _under

if TYPE_CHECKING:
    import urllib3
    from minio import Minio
    from minio.error import S3Error

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("HSISSL_S3_ENDPOINT", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
# Overridable client limits: (env var, default). Reads get long: a 64 MiB part takes a while.
CONNECT_TIMEOUT = ("HSISSL_S3_CONNECT_TIMEOUT", 10.0)  # seconds to open a connection
READ_TIMEOUT = ("HSISSL_S3_TIMEOUT", 120.0)  # seconds one socket read/write may stall
RETRIES = ("HSISSL_S3_RETRIES", 3)  # retries per request (connect, read, HTTP 500/502/503/504)
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"}
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict"}
# Servers without conditional PUTs: set to 0 and leases use write, pause SETTLE_S, verify.
CONDITIONAL_WRITES = ("HSISSL_S3_CONDITIONAL_WRITES", 1)
SETTLE_S = 1.0
_CREDENTIAL_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def _minio() -> ModuleType:
    """The minio SDK, imported on first S3 use: local stores work on machines without it."""
    try:
        import minio
        import minio.commonconfig
        import minio.deleteobjects
        import minio.error
    except ImportError as exc:
        raise ImportError(
            f"s3:// storage needs the 'minio' package, which failed to import ({exc}); install "
            "it with `pip install minio`, or use a local path as the store"
        ) from exc
    return minio


def _env_number(var: str, default: float, *, integer: bool = False) -> float:
    """``var`` as a positive number of seconds (or a count >= 0), else ``default`` if unset."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = -1
    if not math.isfinite(value) or value < 0 or (value == 0 and not integer):
        expected = "an integer >= 0" if integer else "a positive number of seconds"
        raise StorageError(f"environment variable {var}={raw!r}: expected {expected}")
    return value


def _limits() -> tuple[float, float, int]:
    """(connect timeout s, read timeout s, retries) from the environment."""
    return (
        _env_number(*CONNECT_TIMEOUT),
        _env_number(*READ_TIMEOUT),
        int(_env_number(*RETRIES, integer=True)),
    )


def s3_endpoint_from_env() -> str:
    """``http(s)://host[:port]`` from HSISSL_S3_ENDPOINT | AWS_ENDPOINT_URL |
    MLFLOW_S3_ENDPOINT_URL (the first one set); StorageError if none is or it is malformed."""
    var = next((v for v in ENDPOINT_VARS if os.environ.get(v)), None)
    if var is None:
        raise StorageError(
            f"S3 endpoint not configured: set {ENDPOINT_VARS[0]} "
            f"(or {' / '.join(ENDPOINT_VARS[1:])}), e.g. http://127.0.0.1:8333"
        )
    endpoint = os.environ[var]
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise StorageError(f"S3 endpoint {var}={endpoint!r}: expected http(s)://host[:port]")
    return f"{parsed.scheme}://{parsed.netloc}"


def _http_client() -> urllib3.PoolManager:
    """minio's connection pool with bounded timeouts (minio's own waits 300 s, 5 retries)."""
    import certifi
    import urllib3

    connect, read, retries = _limits()
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect, read=read),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=retries, backoff_factor=0.5, status_forcelist=(500, 502, 503, 504)
        ),
    )


def s3_client_from_env(endpoint: str | None = None) -> Minio:
    """A minio client for ``endpoint`` (default :func:`s3_endpoint_from_env`), signed with
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, optional AWS_REGION, and the timeouts of
    HSISSL_S3_CONNECT_TIMEOUT / HSISSL_S3_TIMEOUT / HSISSL_S3_RETRIES."""
    minio = _minio()
    endpoint = endpoint or s3_endpoint_from_env()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not os.environ.get(var):
            raise StorageError(
                f"S3 credentials not configured: environment variable {var} is unset"
            )
    parsed = urlparse(endpoint)
    return minio.Minio(
        parsed.netloc,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        secure=parsed.scheme == "https",
        region=os.environ.get("AWS_REGION") or None,
        http_client=_http_client(),
    )


def _default_cache_dir() -> Path:
    return Path(os.environ.get("HSISSL_CACHE") or Path.home() / ".cache" / "hsissl")


class S3Storage(Storage):
    """``s3://bucket/optional/prefix``; objects are named ``<prefix>/<key>``.

    Opening one makes no request (unless ``create_bucket``). The bucket must exist, except
    that a transaction creates it (the first write of a pipeline, e.g. ingest on a fresh MinIO); ``exists()`` in a
    missing bucket is False, every other operation raises StorageError naming the bucket.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Minio | None = None,
        endpoint: str | None = None,
        create_bucket: bool = False,
    ) -> None:
        self.bucket = bucket
        self.prefix = _clean(prefix, allow_empty=True)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        minio = _minio()  # first: without minio this is an ImportError naming the package
        import urllib3

        self._s3_error: type[S3Error] = minio.error.S3Error
        self._transport_errors = (minio.error.MinioException, urllib3.exceptions.HTTPError)
        if client is None:
            endpoint = endpoint or s3_endpoint_from_env()
            client = s3_client_from_env(endpoint)
        self.endpoint = endpoint or "the client's S3 endpoint"  # for error messages
        self.client = client
        self._bucket_checked = False
        self._conditional = bool(_env_number(*CONDITIONAL_WRITES, integer=True))
        if create_bucket:
            self._ensure_bucket()

    # -- errors

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Turn minio/urllib3 failures into FileNotFoundError (missing key) or StorageError."""
        where = self.join(key) if key else self.uri
        try:
            yield
        except self._s3_error as err:
            raise self._translate(err, key, where) from err
        except self._transport_errors as err:
            connect, read, retries = _limits()
            raise StorageError(
                f"{where}: no usable answer from the S3 endpoint {self.endpoint} "
                f"({type(err).__name__}: {getattr(err, 'reason', None) or err}); check "
                f"{ENDPOINT_VARS[0]} and that the server is reachable (limits: "
                f"{CONNECT_TIMEOUT[0]}={connect:g}s, {READ_TIMEOUT[0]}={read:g}s, "
                f"{RETRIES[0]}={retries})"
            ) from err

    def _no_bucket(self) -> StorageError:
        return StorageError(
            f"s3://{self.bucket}: no such bucket at {self.endpoint}; create it "
            f"(`mc mb <alias>/{self.bucket}`, or the chart's create-buckets job) or fix "
            f"storage.uri / {ENDPOINT_VARS[0]}"
        )

    def _translate(self, err: S3Error, key: str | None, where: str) -> Exception:
        if err.code == "NoSuchBucket":
            return self._no_bucket()
        if err.code in _MISSING_CODES and key:
            return FileNotFoundError(f"{where}: no such object ({err.code})")
        if err.code in _CREDENTIAL_CODES:
            return StorageError(
                f"{where}: the S3 endpoint {self.endpoint} refused the request ({err.code}: "
                f"{err.message}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, that this "
                f"key may use bucket {self.bucket!r}, and that {ENDPOINT_VARS[0]} is the "
                "right server"
            )
        return StorageError(f"{where}: S3 error {err.code} from {self.endpoint}: {err.message}")

    # -- buckets and names

    def _ensure_bucket(self, *, create: bool = True) -> None:
        """Create the bucket if it is missing (transactions only: see the class docstring), or
        with ``create=False`` raise StorageError. Checked once per instance: some servers
        (SeaweedFS) create a missing bucket on the first PUT instead of refusing it."""
        if self._bucket_checked:
            return
        with self._errors():
            if not self.client.bucket_exists(self.bucket):
                if not create:
                    raise self._no_bucket()
                try:
                    self.client.make_bucket(self.bucket)
                    log.info("created bucket s3://%s at %s", self.bucket, self.endpoint)
                except self._s3_error as err:  # another writer may have created it meanwhile
                    if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        self._bucket_checked = True

    def _prepare_write(self) -> None:
        self._ensure_bucket()

    def _name(self, key: str, *, allow_empty: bool = False) -> str:
        key = _clean(key, allow_empty=allow_empty)
        return "/".join(p for p in (self.prefix, key) if p)

    def _root(self) -> str:
        """Object-name prefix of every key of this store ('' or '<prefix>/')."""
        return f"{self.prefix}/" if self.prefix else ""

    def _list_starting(self, start: str) -> list[str]:
        """Keys (relative to the store) whose name starts with ``start``, as a plain string."""
        root = self._root()
        with self._errors(start or None):
            objects = list(
                self.client.list_objects(self.bucket, prefix=root + start or None, recursive=True)
            )
        names = [o.object_name for o in objects if not (o.is_dir or o.object_name.endswith("/"))]
        return sorted(n[len(root) :] for n in names if n.startswith(root))  # folder markers out

    # -- Storage API

    def put_bytes(self, key: str, data: bytes) -> None:
        self._ensure_bucket(create=False)
        with self._errors(key):
            self.client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data))

    def _get_bytes(self, key: str) -> bytes:
        with self._errors(key):
            response = self.client.get_object(self.bucket, self._name(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def put_file(self, local: Path, key: str) -> None:
        self._ensure_bucket(create=False)
        with self._errors(key):
            self.client.fput_object(self.bucket, self._name(key), str(local))  # multipart if big

    def _get_file(self, key: str, local: Path) -> Path:
        local = Path(local)
        self._download(key, local)
        return local

    def _download(self, key: str, local: Path) -> str:
        """Stream ``key`` into ``local`` via a temp file; returns the ETag of those bytes."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with self._errors(key):
                response = self.client.get_object(self.bucket, self._name(key))
                try:
                    with open(tmp, "wb") as f:
                        for chunk in response.stream(1 << 20):
                            f.write(chunk)
                    etag = response.headers.get("ETag", "").strip('"')
                finally:
                    response.close()
                    response.release_conn()
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return etag

    def _exists(self, key: str) -> bool:
        with self._errors(key):
            try:
                stat = self.client.stat_object(self.bucket, self._name(key))
            except self._s3_error as err:
                if err.code in _MISSING_CODES:  # a missing bucket holds no keys either
                    return False
                raise
        return not stat.is_dir

    def _list(self, prefix: str) -> list[str]:
        rel = _clean(prefix, allow_empty=True)
        return [k for k in self._list_starting(rel) if _under(k, rel)]

    def objects(self, prefix: str = "") -> dict[str, tuple[int, str]]:
        """Key -> (size, ETag) of every object under ``prefix`` (folder semantics, as
        :meth:`list`); StorageError naming the bucket when it is missing."""
        rel = _clean(prefix, allow_empty=True)
        root = self._root()
        with self._errors(rel or None):
            found = list(self.client.list_objects(self.bucket, prefix=root + rel or None,
                                                  recursive=True))  # fmt: skip
        out = {}
        for o in found:
            key = o.object_name[len(root) :]
            if not (o.is_dir or o.object_name.endswith("/")) and _under(key, rel):
                out[key] = (int(o.size or 0), (o.etag or "").strip('"'))
        return dict(sorted(out.items()))

    def delete_prefix(self, prefix: str) -> None:
        self.forget_pointer(_clean(prefix))
        self._delete_keys(self._list(_clean(prefix)))

    def _delete_keys(self, keys: list[str]) -> None:
        if not keys:
            return
        objects = [_minio().deleteobjects.DeleteObject(self._name(k)) for k in keys]
        with self._errors():
            errors = list(self.client.remove_objects(self.bucket, objects))  # lazy: iterate
        if errors:
            raise StorageError(
                f"{self.uri}: failed to delete {len(errors)} object(s) at {self.endpoint}: "
                f"{errors[:3]}"
            )

    def _read_optional(self, key: str) -> bytes | None:
        with self._errors(key):
            try:
                response = self.client.get_object(self.bucket, self._name(key))
            except self._s3_error as err:
                if err.code in _MISSING_CODES:  # a missing bucket holds no keys either
                    return None
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    # -- conditional writes (leases)

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        with self._errors(key):
            response = self.client.get_object(self.bucket, self._name(key))
            try:
                return response.read(), response.headers.get("ETag", "").strip('"')
            finally:
                response.close()
                response.release_conn()

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        if self._conditional:
            return self._put_conditional(key, data, {"If-None-Match": "*"})
        if self._exists(key):
            return None
        self.put_bytes(key, data)
        return self._settled(key, data)

    def put_if_tag(self, key: str, data: bytes, tag: str) -> str | None:
        if self._conditional:
            return self._put_conditional(key, data, {"If-Match": f'"{tag}"'})
        try:
            if self.get_tagged(key)[1] != tag:
                return None
        except FileNotFoundError:
            return None
        self.put_bytes(key, data)
        return self._settled(key, data)

    def _put_conditional(self, key: str, data: bytes, condition: dict[str, str]) -> str | None:
        """PUT with an HTTP precondition (AWS S3 since 2024-08, MinIO, SeaweedFS 4.48 answer
        412 PreconditionFailed); None when the precondition fails. minio-py 7.2 has no public
        parameter for it (``put_object`` turns unknown headers into x-amz-meta-*), hence its
        ``_put_object``."""
        self._ensure_bucket(create=False)
        headers = {"Content-Type": "application/json", **condition}
        with self._errors(key):
            try:
                result = self.client._put_object(self.bucket, self._name(key), data, headers)
            except self._s3_error as err:
                if err.code in _CONDITION_FAILED or (
                    err.code == "NoSuchKey" and "If-Match" in condition
                ):
                    return None
                if err.code != "NotImplemented":
                    raise
                log.warning("%s does not support conditional writes; leases fall back to "
                            "write-and-verify (%s)", self.endpoint, CONDITIONAL_WRITES[0])  # fmt: skip
                self._conditional = False
                return self.put_if_absent(key, data) if "If-None-Match" in condition else \
                    self.put_if_tag(key, data, condition["If-Match"].strip('"'))  # fmt: skip
        return result.etag

    def _settled(self, key: str, data: bytes) -> str | None:
        """Fallback without conditional writes: after a pause, the write counts only if the
        object still holds our bytes (racing writers within the pause: the last one wins)."""
        time.sleep(SETTLE_S)
        try:
            current, tag = self.get_tagged(key)
        except FileNotFoundError:
            return None
        return tag if current == data else None

    def _local_path(self, key: str) -> None:
        return None

    def _open_local(self, key: str, cache_dir: Path | None = None) -> Path:
        """The cached copy under ``cache_dir`` (default $HSISSL_CACHE or ~/.cache/hsissl),
        downloaded again unless its recorded ETag and size match the object's."""
        name = self._name(key)
        local = Path(cache_dir or _default_cache_dir()) / self.bucket / name
        tag = local.with_name(f"{local.name}.hsissl-etag")  # ETag of the cached bytes
        with self._errors(key):
            stat = self.client.stat_object(self.bucket, name)
        etag = (stat.etag or "").strip('"')
        cached = tag.read_text() if tag.is_file() else None
        if etag and cached == etag and local.is_file() and local.stat().st_size == stat.size:
            return local
        tag.unlink(missing_ok=True)  # an old tag must never vouch for new bytes
        got = self._download(key, local)
        if got:
            tmp = tag.with_name(f".{tag.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(got)
            os.replace(tmp, tag)
        return local
