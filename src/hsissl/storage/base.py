"""The storage interface (:class:`Storage`, :class:`Transaction`) and its key rules."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """The store cannot be used as configured: URI, endpoint, credentials, bucket or network."""


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
            try:
                self._abort()
            except Exception:
                if exc is None:
                    raise
                # The caller's error says what went wrong; leftovers are removed by the next
                # transaction on this prefix.
                log.warning("could not clean up the aborted transaction on %s",
                            self.storage.join(self.prefix), exc_info=True)  # fmt: skip
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
        self._publish([_clean(key) for key in final])
        self._state = "committed"

    @abstractmethod
    def _local(self, key: str) -> Path: ...

    @abstractmethod
    def _begin(self) -> None: ...

    @abstractmethod
    def _done(self, key: str, local: Path) -> None: ...

    @abstractmethod
    def _publish(self, final: list[str]) -> None:
        """Make the staged folder the committed one; ``final`` (the markers) become visible last."""

    @abstractmethod
    def _abort(self) -> None: ...


# ----------------------------------------------------------------------------- local directory
