"""The storage interface (:class:`Storage`) and its key rules."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path

from hsissl.storage.keys import StorageError, _clean  # noqa: F401 (re-exported)

NO_POINTER_TTL_S = 1.0


def _under(key: str, prefix: str) -> bool:
    """Folder semantics: ``key`` is ``prefix`` itself or inside it."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


class Storage(ABC):
    """Root of a key/value file store; see the module docstring for key and prefix rules.

    Reads (``get_bytes``, ``exists``, ``list``, ``open_local``, ...) see committed folders
    through their pointer (:mod:`hsissl.storage.commit`): ``ds/manifest.json`` is read from the
    version ``ds/_current.json`` names. A store instance remembers the pointers it has read, so
    one reader sees one version throughout; a commit through the same instance refreshes it.
    Writes (``put_bytes``, ``put_file``) go to the key as given.
    """

    uri: str

    def join(self, key: str) -> str:
        """Full URI of ``key``."""
        key = _clean(key, allow_empty=True)
        return f"{self.uri}/{key}" if key else self.uri

    # -- committed-folder view (the pointer format belongs to hsissl.storage.commit)

    def _pointers(self) -> dict[str, tuple[dict | None, float]]:
        cache = self.__dict__.get("_pointer_cache")
        if cache is None:
            cache = self.__dict__["_pointer_cache"] = {}
        return cache

    def pointer(self, root: str) -> dict | None:
        """The commit pointer of folder ``root`` ('' = the store root), or None (cached)."""
        from hsissl.storage.commit import POINTER, parse_pointer

        cache = self._pointers()
        hit = cache.get(root)
        # A pointer read stays (one reader, one version); "no pointer" is asked again after
        # NO_POINTER_TTL_S, so a poller sees a folder's first commit.
        if hit is None or (hit[0] is None and time.monotonic() - hit[1] > NO_POINTER_TTL_S):
            key = f"{root}/{POINTER}" if root else POINTER
            data = self._read_optional(key)
            hit = (None if data is None else parse_pointer(data, self.join(key)), time.monotonic())
            cache[root] = hit
        return hit[0]

    def forget_pointer(self, root: str) -> None:
        """Drop the cached pointers of ``root`` and the folders in it (after this process moved
        or deleted them)."""
        cache = self._pointers()
        for cached in [r for r in cache if _under(r, root)]:
            del cache[cached]

    def _committed_root(self, key: str) -> tuple[str, dict] | None:
        """(root, pointer) of the committed folder holding ``key`` (``key`` itself included)."""
        parts = key.split("/") if key else []
        for depth in range(len(parts) + 1):
            root = "/".join(parts[:depth])
            pointer = self.pointer(root)
            if pointer is not None:
                return root, pointer
        return None

    def resolve(self, key: str) -> str | None:
        """The stored key that holds logical ``key``: itself outside committed folders, the
        version's copy inside one, None when the committed version has no such file."""
        key = _clean(key)
        parts = key.split("/")
        for depth in range(len(parts)):
            root = "/".join(parts[:depth])
            pointer = self.pointer(root)
            if pointer is not None:
                target = pointer["files"].get("/".join(parts[depth:]))
                if target is None:
                    return None
                return f"{root}/{target}" if root else target
        return key

    def _resolved(self, key: str) -> str:
        stored = self.resolve(key)
        if stored is None:
            raise FileNotFoundError(f"{self.join(key)}: no such file in the committed version")
        return stored

    # -- reads (logical keys)

    def get_bytes(self, key: str) -> bytes:
        """Read ``key``; FileNotFoundError naming the URI when it is missing."""
        return self._get_bytes(self._resolved(key))

    def get_file(self, key: str, local: Path) -> Path:
        """Download/copy ``key`` to ``local`` (atomically on the local side); returns ``local``."""
        return self._get_file(self._resolved(key), local)

    def exists(self, key: str) -> bool:
        """Whether ``key`` is an object/file (folders are not keys)."""
        stored = self.resolve(key)
        return stored is not None and self._exists(stored)

    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted, relative to the root; committed
        folders list their current version's files, never versions, pointers or leases."""
        from hsissl.storage.commit import POINTER, is_internal

        prefix = _clean(prefix, allow_empty=True)
        found = self._committed_root(prefix)
        if found is not None:
            root, pointer = found
            keys = [f"{root}/{rel}" if root else rel for rel in pointer["files"]]
            return sorted(k for k in keys if _under(k, prefix))
        raw = self._list(prefix)
        roots = [k[: -len(POINTER) - 1] for k in raw if k.endswith("/" + POINTER)]
        out = [k for k in raw if not is_internal(k) and not any(_under(k, r) for r in roots)]
        for root in roots:
            pointer = self.pointer(root)
            if pointer is not None:
                out += [f"{root}/{rel}" for rel in pointer["files"]]
        return sorted(k for k in out if _under(k, prefix))

    def local_path(self, key: str) -> Path | None:
        """The real local path of ``key`` (callers may memmap it), or None for remote stores."""
        return self._local_path(self.resolve(key) or _clean(key))

    def open_local(self, key: str, cache_dir: Path | None = None) -> Path:
        """A readable local file with the content of ``key`` (downloaded to a cache if remote)."""
        return self._open_local(self._resolved(key), cache_dir)

    def transaction(self, prefix: str, *, carry: bool = False, lease=None):
        """An all-or-nothing writer for the folder ``prefix`` (:class:`~hsissl.storage.commit.
        Commit`); use it as a context manager. ``carry``: files not rewritten stay as they
        were in the previous version (checkpoints); ``lease``: one the caller already holds."""
        from hsissl.storage.commit import Commit

        return Commit(self, prefix, carry=carry, lease=lease)

    # -- writes (stored keys)

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` atomically."""

    @abstractmethod
    def put_file(self, local: Path, key: str) -> None:
        """Upload/copy the local file to ``key`` atomically."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every stored key under ``prefix`` and ``prefix`` itself as a key."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create ``key`` only if it does not exist: its tag, or None if it existed."""

    @abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """(content, tag) of ``key``; the tag changes whenever the content is replaced."""

    @abstractmethod
    def put_if_tag(self, key: str, data: bytes, tag: str) -> str | None:
        """Replace ``key`` only if its tag is still ``tag``: the new tag, or None."""

    # -- backend primitives on stored keys

    @abstractmethod
    def _get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def _read_optional(self, key: str) -> bytes | None:
        """Content of ``key``, None if it (or the bucket) does not exist."""

    @abstractmethod
    def _get_file(self, key: str, local: Path) -> Path: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _list(self, prefix: str) -> list[str]:
        """Every stored key under ``prefix`` (folder semantics), sorted."""

    @abstractmethod
    def _delete_keys(self, keys: list[str]) -> None: ...

    @abstractmethod
    def _local_path(self, key: str) -> Path | None: ...

    @abstractmethod
    def _open_local(self, key: str, cache_dir: Path | None) -> Path: ...

    def _prepare_write(self) -> None:
        """Make the store writable before a commit (S3: create a missing bucket)."""
        return None  # a folder is created as it is written

    def _staging_path(self, key: str) -> Path | None:
        """Where a transaction may write stored ``key`` in place (local folders), else None."""
        return None

    def _upload(self, local: Path, key: str) -> None:
        """Store the finished local file of a transaction at stored ``key``."""
        self.put_file(local, key)
