"""One small storage interface over a local directory or an S3 bucket (minio SDK).

Keys are '/'-separated strings relative to the store root. ``list``/``delete_prefix`` treat a
prefix as a folder: ``"ds"`` covers ``"ds"`` and ``"ds/..."`` but not ``"ds2/..."``.

A transaction (:class:`Commit`, from ``storage.transaction(prefix)``) writes a whole folder
(dataset, checkpoint, result) all-or-nothing as a new immutable version and publishes it with
one atomic pointer write; one writer per folder at a time, enforced by a lease. The protocol
lives in :mod:`hsissl.storage.commit`; readers see committed folders through the pointer.

S3 failures (endpoint, credentials, bucket, network) raise :class:`StorageError`; a missing key
raises FileNotFoundError on both backends.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from hsissl.storage.base import Storage, StorageError
from hsissl.storage.commit import Commit, Lease, LeaseHeld, LeaseLost
from hsissl.storage.local import LocalStorage
from hsissl.storage.s3 import S3Storage, s3_client_from_env, s3_endpoint_from_env

Transaction = Commit  # the name the stages use for the writer of a folder

__all__ = ["Commit", "Lease", "LeaseHeld", "LeaseLost", "LocalStorage", "S3Storage", "Storage",
           "StorageError", "Transaction", "open_storage", "s3_client_from_env",
           "s3_endpoint_from_env"]  # fmt: skip


def open_storage(uri: str | Path) -> Storage:
    """``path``, ``/abs/path``, ``file:///abs`` -> LocalStorage; ``s3://bucket[/prefix]`` -> S3."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URI {uri!r}: expected s3://bucket[/prefix]")
        return S3Storage(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"storage URI {uri!r}: expected file:///absolute/path")
        return LocalStorage(url2pathname(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # plain path (or a Windows drive letter)
        return LocalStorage(Path(uri).absolute())
    raise ValueError(f"storage URI {uri!r}: unsupported scheme {parsed.scheme!r} (file, s3)")
