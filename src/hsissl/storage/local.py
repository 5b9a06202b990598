"""A local directory as a store: ``os.replace`` makes single-file writes atomic."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from pathlib import Path

from hsissl.storage.base import Storage, _clean


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` via a temp file in dst's folder, so dst is never half-written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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

    def _tmp_beside(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._tmp_beside(path)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local: Path, key: str) -> None:
        _atomic_copy(Path(local), self._path(key))

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        path = self._path(key)
        tmp = self._tmp_beside(path)
        try:
            tmp.write_bytes(data)
            os.link(tmp, path)  # atomic, and fails if the name exists: never half-written
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        return _tag(data)

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        data = self._get_bytes(key)
        return data, _tag(data)

    def put_if_tag(self, key: str, data: bytes, tag: str) -> str | None:
        path = self._path(key)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # compare-and-replace under the folder's lock
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return None
            if _tag(current) != tag:
                return None
            self.put_bytes(key, data)
            return _tag(data)
        finally:
            os.close(fd)  # releases the lock

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)  # an empty prefix (the whole store) is refused here
        self.forget_pointer(_clean(prefix))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    # -- primitives on stored keys

    def _get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def _read_optional(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _get_file(self, key: str, local: Path) -> Path:
        local = Path(local)
        _atomic_copy(self._existing(key), local)
        return local

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix, allow_empty=True)
        if base.is_file():
            return [_clean(prefix)]
        if not base.is_dir():
            return []
        keys = [p.relative_to(self.root).as_posix() for p in base.rglob("*")
                if p.is_file() and not p.name.endswith(".tmp")]  # fmt: skip
        return sorted(keys)

    def _delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            for parent in path.parents:  # empty folders left behind go too
                if parent == self.root or not parent.is_relative_to(self.root):
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break

    def _local_path(self, key: str) -> Path:
        return self._path(key)

    def _open_local(self, key: str, cache_dir: Path | None) -> Path:
        return self._existing(key)

    def _staging_path(self, key: str) -> Path:
        return self._path(key)

    def _upload(self, local: Path, key: str) -> None:
        if local != self._path(key):  # staged in place already
            self.put_file(local, key)

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.join(key)}: no such file")
        return path
