"""WHU-OHS scenes in an S3 bucket (``data.source=s3://bucket/prefix``), read in place.

The cluster route: WHU-OHS uploaded once to the object store, ingested from there. The layout
is the folder's (``<prefix>/<split>/image/*.tif`` paired with ``label/*.tif``), discovery and
pairing share the folder's code and messages (``hsissl.data.scenes.pair_scenes``), and each
scene is read by GDAL's ``/vsis3/`` driver with HTTP range requests: nothing is downloaded to
disk, and memory holds the scenes in flight as for a local folder (header checks read only the
GeoTIFF headers). Endpoint, credentials and timeouts are the store's (``HSISSL_S3_ENDPOINT``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``HSISSL_S3_*``), so a source bucket on the
artifact store's server needs no extra settings.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlparse

from hsissl.data.scenes import ScenePair, Violation, pair_scenes
from hsissl.storage import StorageError
from hsissl.storage.s3 import S3Storage, _limits, s3_endpoint_from_env

SCHEME = "s3://"
LAYOUT = "a WHU-OHS-layout prefix: <prefix>/{tr,va,ts}/image/*.tif with label/*.tif"


@dataclass(frozen=True)
class ObjectFile:
    """One scene file in S3: named ``s3://…`` in messages, opened by GDAL as ``/vsis3/…``."""

    bucket: str
    key: str
    size: int
    etag: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def __fspath__(self) -> str:  # rasterio.open(ObjectFile) reads it in place
        return f"/vsis3/{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def parent(self) -> PurePosixPath:  # as Path.parent: the fingerprint names image/ or label/
        return PurePosixPath(self.key).parent


@dataclass(frozen=True)
class ObjectRoot:
    """``s3://bucket/prefix`` as a source root; ``root / "tr"`` is the split's prefix."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> ObjectRoot:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"data.source {uri!r}: expected s3://bucket/prefix")
        return cls(parsed.netloc, parsed.path.strip("/"))

    def __truediv__(self, part: str) -> ObjectRoot:
        return ObjectRoot(self.bucket, "/".join(p for p in (self.prefix, part) if p))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


def discover_s3(root: ObjectRoot, splits: list[str]) -> tuple[dict[str, list[ScenePair]],
                                                               list[Violation]]:  # fmt: skip
    """Pairs per split as :func:`hsissl.data.scenes.discover` finds them in a folder; a missing
    bucket or an empty prefix is one violation naming it and the endpoint."""
    store = S3Storage(root.bucket)
    try:
        objects = store.objects(root.prefix)
    except StorageError as exc:
        if "no such bucket" not in str(exc):
            raise
        return {}, [Violation(f"{SCHEME}{root.bucket}", "bucket",
                              f"no such bucket at {store.endpoint}", f"a bucket holding {LAYOUT}")]  # fmt: skip
    if not objects:
        return {}, [Violation(str(root), "dataset root",
                              f"no objects under this prefix at {store.endpoint}", LAYOUT)]  # fmt: skip
    listing: dict[str, tuple[dict[str, ObjectFile], dict[str, ObjectFile]]] = {}
    for split in splits:
        found: dict[str, dict[str, ObjectFile]] = {"image": {}, "label": {}}
        for key, (size, etag) in objects.items():
            parent = (root / split).prefix + "/"
            rest = key[len(parent) :] if key.startswith(parent) else ""
            kind, _, name = rest.partition("/")
            if kind in found and name.endswith(".tif") and "/" not in name:
                file = ObjectFile(root.bucket, key, size, etag)
                found[kind][file.stem] = file
        listing[split] = (found["image"], found["label"])
    return pair_scenes(root, splits, listing)


def gdal_options() -> dict[str, str]:
    """GDAL settings that make ``/vsis3/`` talk to the store's endpoint, path-style, with the
    store's limits (credentials: GDAL reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""
    endpoint = urlparse(s3_endpoint_from_env())
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not os.environ.get(var):
            raise StorageError(f"S3 credentials not configured: environment variable {var} is "
                               "unset (needed to read an s3:// data.source)")  # fmt: skip
    connect, read, retries = _limits()
    return {
        "AWS_S3_ENDPOINT": endpoint.netloc,
        "AWS_HTTPS": "YES" if endpoint.scheme == "https" else "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_REGION": os.environ.get("AWS_REGION") or "us-east-1",
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no listing per open: keys are known
        "GDAL_HTTP_CONNECTTIMEOUT": f"{connect:g}",
        "GDAL_HTTP_TIMEOUT": f"{read:g}",
        "GDAL_HTTP_MAX_RETRY": str(retries),
        "GDAL_HTTP_RETRY_DELAY": "0.5",
        "VSI_CACHE": "FALSE",  # bounded memory: no per-file block cache beyond GDAL's default
    }


@contextmanager
def reading(root: object) -> Iterator[None]:
    """GDAL configured for ``root`` while scenes are read (rasterio sets these process-wide,
    so the ingest's reader threads see them); nothing to do for a local folder."""
    if not isinstance(root, ObjectRoot):
        yield
        return
    import rasterio

    with rasterio.Env(**gdal_options()):
        yield
