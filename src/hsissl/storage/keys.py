"""What every storage module shares: the error of an unusable store and key normalisation
(a module of its own so that :mod:`hsissl.storage.commit` needs nothing else at run time)."""

from __future__ import annotations


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
