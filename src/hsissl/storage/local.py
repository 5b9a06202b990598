"""A local directory as a store: transactions stage a folder and rename it in."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from hsissl.storage.base import Storage, Transaction, _clean


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` via a temp file in dst's folder, so dst is never half-written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


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

    def _publish(self, final: list[str]) -> None:
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
