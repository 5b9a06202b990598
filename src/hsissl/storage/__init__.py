"""One small storage interface over a local directory or an S3 bucket (minio SDK).

Keys are '/'-separated strings relative to the store root. ``list``/``delete_prefix`` treat a
prefix as a folder: ``"ds"`` covers ``"ds"`` and ``"ds/..."`` but not ``"ds2/..."``.

A :class:`Transaction` writes a whole folder (dataset, checkpoint) all-or-nothing: it stages
into ``<prefix>.partial-<id>`` and touches ``<prefix>`` only in commit, so a failed or killed
writer leaves the committed version as it was. A folder is complete exactly when its commit
marker (e.g. ``manifest.json``, written last by :meth:`Transaction.commit`) exists; commit
markers belong at the top level of the transaction's prefix. Locally the commit is a rename
(readers see the old folder or the new one); on S3 it is a sequence of copies during which the
marker is absent (see :class:`S3Transaction`). One writer per prefix at a time.

S3 failures (endpoint, credentials, bucket, network) raise :class:`StorageError`; a missing key
raises FileNotFoundError on both backends.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from hsissl.storage.base import Storage, StorageError, Transaction
from hsissl.storage.local import LocalStorage, LocalTransaction
from hsissl.storage.s3 import S3Storage, S3Transaction, s3_client_from_env, s3_endpoint_from_env

__all__ = ["LocalStorage", "LocalTransaction", "S3Storage", "S3Transaction", "Storage",
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
