"""The commit protocol: a folder (dataset, checkpoint, result, report) that no crash can lose.

A committed folder ``<prefix>/`` holds

- ``_v/<version>/…``  immutable versions, one per commit, each written under its own prefix;
- ``_current.json``   the pointer: which stored file makes up each file of ``<prefix>`` now;
- ``_lease.json``     present while one writer owns ``<prefix>`` (owner, host, pid, expiry).

A commit (as Delta Lake and Iceberg do it): take the lease with a conditional create → write the
new version under ``_v/<id>/`` → check the lease is still ours → replace ``_current.json`` with
one single-object write (a PUT on S3, ``os.replace`` in a folder): the commit point → delete the
versions none of the last ``HSISSL_KEEP_VERSIONS`` commits uses → release the lease. Readers
(:class:`~hsissl.storage.base.Storage`) resolve the pointer, so a crash at any moment leaves
the old version or the new one current, never neither; a crashed writer's unfinished version is
removed by the next commit, which only the next lease holder makes.

The lease is created with ``If-None-Match: *`` on S3 (AWS S3 since 2024-08, MinIO since
2024-08, SeaweedFS 4.48: checked by tests/test_storage.py) and with ``link()`` in a folder. It
expires ``HSISSL_LEASE_TTL`` seconds after its last renewal (a thread renews it), or at once
when its process is gone from this host; a stale lease is taken over with ``If-Match`` on its
ETag, so two writers never both take it. Servers without conditional PUTs: see
``HSISSL_S3_CONDITIONAL_WRITES`` in hsissl.storage.s3.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsissl.storage.keys import StorageError, _clean

if TYPE_CHECKING:  # a Commit writes through the Storage that opened it (Storage.transaction)
    from hsissl.storage.base import Storage

log = logging.getLogger(__name__)

COMMIT_FORMAT = "hsissl-commit/1"
POINTER = "_current.json"
VERSIONS = "_v"
LEASE = "_lease.json"
INTERNAL = {POINTER, VERSIONS, LEASE}
KEEP_VERSIONS = ("HSISSL_KEEP_VERSIONS", 2)  # versions kept after a commit, the new one included
LEASE_TTL = ("HSISSL_LEASE_TTL", 60.0)  # seconds a lease outlives its last renewal
# What a writer of each top-level folder is called in "another <purpose> of '<name>' is running".
PURPOSES = {"datasets": "ingest", "checkpoints": "pretraining", "results": "evaluation",
            "reports": "report"}  # fmt: skip


_LIVE_TOKENS: set[str] = set()  # leases this process holds now (its own stale ones are not)


class LeaseHeld(StorageError):
    """Another live writer owns the folder."""


class LeaseLost(StorageError):
    """This writer's lease expired or was taken over before it committed."""


def is_internal(key: str) -> bool:
    """Whether a stored key is a version, pointer or lease (hidden from listings)."""
    return any(part in INTERNAL for part in key.split("/"))


def parse_pointer(data: bytes, where: str) -> dict[str, Any]:
    try:
        pointer = json.loads(data)
        ok = pointer.get("format") == COMMIT_FORMAT and isinstance(pointer.get("files"), dict)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise StorageError(f"{where}: not a commit pointer of format {COMMIT_FORMAT!r}")
    return pointer


def _setting(var: str, default: float, minimum: float) -> float:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        raise StorageError(f"environment variable {var}={raw!r}: expected a number >= {minimum:g}")
    return value


def _now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).isoformat(
        timespec="seconds"
    )


def _short(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:300]


# ----------------------------------------------------------------------------- the lease


class Lease:
    """The one-writer lock of a committed folder; a context manager (see the module doc)."""

    def __init__(self, storage: Storage, prefix: str, purpose: str | None = None) -> None:
        self.storage, self.prefix = storage, _clean(prefix)
        self.key = f"{self.prefix}/{LEASE}"
        self.name = self.prefix.rsplit("/", 1)[-1]
        self.purpose = purpose or PURPOSES.get(self.prefix.split("/")[0], "writer")
        self.ttl = _setting(*LEASE_TTL, minimum=1.0)
        self.token = uuid.uuid4().hex
        self.started = _now_iso()
        self.lost: str | None = None  # why the lease is no longer ours
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (containers with a bare uid)
            user = f"uid {os.getuid()}"
        return json.dumps({
            "owner": f"{user}@{socket.gethostname()} pid {os.getpid()}", "host": socket.gethostname(),
            "pid": os.getpid(), "token": self.token, "purpose": self.purpose,
            "started": self.started, "expires": time.time() + self.ttl,
        }).encode()  # fmt: skip

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(remote=not isinstance(exc, StorageError))  # a dead store: do not wait again

    def acquire(self) -> Lease:
        """Take the lease, or raise LeaseHeld naming its live owner."""
        self.storage._prepare_write()
        _LIVE_TOKENS.add(self.token)  # before the create: a thread of ours never sees it stale
        try:
            return self._acquire()
        except BaseException:
            _LIVE_TOKENS.discard(self.token)
            raise

    def _acquire(self) -> Lease:
        for _ in range(5):  # each round: someone released or took over meanwhile
            tag = self.storage.put_if_absent(self.key, self._record())
            if tag is not None:
                return self._held(tag)
            try:
                data, tag = self.storage.get_tagged(self.key)
            except FileNotFoundError:
                continue
            info = self._parse(data)
            if not self._stale(info):
                raise LeaseHeld(self._held_message(info))
            tag = self.storage.put_if_tag(self.key, self._record(), tag)
            if tag is not None:
                log.warning("took over the stale lease of %s from %s (since %s)",
                            self.storage.join(self.prefix), info.get("owner", "?"),
                            info.get("started", "?"))  # fmt: skip
                return self._held(tag)
        raise LeaseHeld(f"another {self.purpose} of '{self.name}' keeps taking "
                        f"{self.storage.join(self.key)}; try again")  # fmt: skip

    def _held(self, tag: str) -> Lease:
        self._tag = tag
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.name}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        return self

    @staticmethod
    def _parse(data: bytes) -> dict[str, Any]:
        try:
            info = json.loads(data)
            return info if isinstance(info, dict) else {}
        except ValueError:
            return {}  # unreadable: treated as expired

    @staticmethod
    def _stale(info: dict[str, Any]) -> bool:
        if float(info.get("expires", 0)) < time.time():
            return True
        if info.get("host") != socket.gethostname():
            return False
        if info.get("pid") == os.getpid():
            return info.get("token") not in _LIVE_TOKENS  # ours, from a writer that is done
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return True  # its process is gone: nobody will renew it
        except (PermissionError, ValueError, KeyError, OverflowError):
            return False
        return False

    def _held_message(self, info: dict[str, Any]) -> str:
        until = _now_iso(float(info.get("expires", 0)))
        return (f"another {self.purpose} of '{self.name}' is running (owner "
                f"{info.get('owner', '?')}, since {info.get('started', '?')}); its lease "
                f"{self.storage.join(self.key)} expires at {until} unless renewed; wait for "
                "it to finish, or rerun after that time if it died")  # fmt: skip

    def _renew_loop(self) -> None:
        expires = time.time() + self.ttl
        while not self._stop.wait(self.ttl / 3):
            try:
                tag = self.storage.put_if_tag(self.key, self._record(), self._tag or "")
            except Exception as exc:  # the store is down: try again until the lease expires
                if time.time() > expires:
                    self.lost = f"it could not be renewed before it expired ({_short(exc)})"
                    return
                continue
            if tag is None:
                self.lost = "another writer took it over"
                return
            self._tag, expires = tag, time.time() + self.ttl

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still ours (just before a commit point)."""
        if self.lost is None:
            data = self.storage._read_optional(self.key)
            if data is None or self._parse(data).get("token") != self.token:
                self.lost = "another writer took it over"
        if self.lost is not None:
            raise LeaseLost(f"{self.storage.join(self.prefix)}: lost the lease of this "
                            f"{self.purpose} ({self.lost}); nothing was committed")  # fmt: skip

    def release(self, *, remote: bool = True) -> None:
        """Stop renewing and delete the lease if it is still ours (``remote=False``: the store
        is unreachable; the lease expires by itself)."""
        self._stop.set()
        _LIVE_TOKENS.discard(self.token)
        if self._thread is not None:  # not waiting out a renewal stuck on a dead store
            self._thread.join(timeout=1.0)
            self._thread = None
        if not remote or self._tag is None:
            return
        try:
            data = self.storage._read_optional(self.key)
            if data is not None and self._parse(data).get("token") == self.token:
                self.storage._delete_keys([self.key])
        except Exception as exc:
            log.warning("note: could not release the lease %s (%s); it expires by itself",
                        self.storage.join(self.key), _short(exc))  # fmt: skip
        self._tag = None


# ----------------------------------------------------------------------------- the commit


class Commit:
    """Context manager that writes a new version of ``prefix`` and publishes it on
    :meth:`commit`; leaving the block by an exception, or without ``commit()``, removes what it
    wrote (the exception always propagates).

    ``path(key)`` gives a local file to write, ``done(key)`` says it is complete (S3 uploads
    it then); ``put_bytes`` does both for small files. ``carry=True`` keeps the files of the
    previous version that this one does not rewrite (a checkpoint adds train.pt to encoder.pt).
    """

    def __init__(self, storage: Storage, prefix: str, *, carry: bool = False,
                 lease: Lease | None = None) -> None:  # fmt: skip
        self.storage = storage
        self.prefix = _clean(prefix)
        self.carry = carry
        self.lease, self._own_lease = lease, lease is None
        self.version = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.base = f"{self.prefix}/{VERSIONS}/{self.version}"
        self._state = "new"  # new -> open -> committed | aborted
        self._pending: dict[str, Path] = {}  # keys handed out by path() and not yet done()
        self._written: list[str] = []
        self._broken: Exception | None = None  # the first failed upload: the rest fail at once
        self.tmpdir: Path | None = None

    def __enter__(self) -> Commit:
        if self._state != "new":
            raise RuntimeError(f"transaction on {self.storage.join(self.prefix)} already used")
        self.storage._prepare_write()
        if self.lease is None:
            self.lease = Lease(self.storage, self.prefix).acquire()
        if self.storage._staging_path(self.base) is None:
            self.tmpdir = Path(tempfile.mkdtemp(prefix="hsissl-tx-"))
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        reachable = not isinstance(exc, StorageError)  # a dead store: do not wait on it again
        try:
            if self._state == "open":
                self._state = "aborted"
                self._abort(reachable)
        finally:
            if self._own_lease and self.lease is not None:
                self.lease.release(remote=reachable)
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
        return False

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(
                f"transaction on {self.storage.join(self.prefix)} is {self._state}; "
                "use it inside a `with` block and before commit()"
            )

    def _local(self, key: str) -> Path:
        in_place = self.storage._staging_path(f"{self.base}/{key}")
        if in_place is not None:
            return in_place
        assert self.tmpdir is not None
        return self.tmpdir / key

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
        if self._broken is not None:  # do not queue more work on a store that just failed
            raise StorageError(f"{self.storage.join(self.prefix)}: not uploading {key}: an "
                               f"earlier upload of this version failed ({_short(self._broken)})")  # fmt: skip
        try:
            self.storage._upload(local, f"{self.base}/{key}")
        except StorageError as exc:
            self._broken = exc
            raise
        if self.tmpdir is not None:
            local.unlink()
        self._pending.pop(key, None)
        if key not in self._written:
            self._written.append(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write a small object into the transaction."""
        self._check_open()
        self.path(key).write_bytes(data)
        self.done(key)

    def commit(self, final: dict[str, bytes] | None = None) -> None:
        """Write ``final`` (e.g. manifest.json), then make this version the current one."""
        self._check_open()
        forgotten = sorted(k for k, p in self._pending.items() if p.exists())
        if forgotten:
            raise RuntimeError(
                f"transaction on {self.storage.join(self.prefix)}: files written via path() but "
                f"never marked done(): {forgotten}"
            )
        for key, data in (final or {}).items():
            self.put_bytes(key, data)
        self.storage.forget_pointer(self.prefix)  # the pointer as it is now, not as cached
        previous = self.storage.pointer(self.prefix)
        files = dict(previous["files"]) if self.carry and previous else {}
        files |= {key: f"{VERSIONS}/{self.version}/{key}" for key in self._written}
        uses = sorted({target.split("/")[1] for target in files.values()})
        keep = int(_setting(*KEEP_VERSIONS, minimum=1))
        history = [{"version": self.version, "uses": uses}, *(previous or {}).get("history", [])]
        pointer = {"format": COMMIT_FORMAT, "version": self.version, "committed": _now_iso(),
                   "owner": self.lease.token if self.lease else "", "files": files,
                   "history": history[:keep]}  # fmt: skip
        assert self.lease is not None
        self.lease.check()
        self.storage.put_bytes(f"{self.prefix}/{POINTER}", json.dumps(pointer, indent=1).encode())
        self._state = "committed"  # the commit point: from here on, failures only cost space
        self.storage.forget_pointer(self.prefix)
        try:
            self._collect(history[:keep])
        except Exception as exc:
            log.warning("note: committed %s, but could not remove its old versions (%s); the "
                        "next commit removes them", self.storage.join(self.prefix), _short(exc))  # fmt: skip

    def _collect(self, history: list[dict[str, Any]]) -> None:
        """Delete what no kept commit uses: older versions, an unfinished version of a crashed
        writer, and the files of the layout before versions (a plain folder)."""
        keep = {version for commit in history for version in commit["uses"]}
        stale = []
        for key in self.storage._list(self.prefix):
            rel = key[len(self.prefix) + 1 :]
            head, _, rest = rel.partition("/")
            if head == VERSIONS:
                if rest.split("/")[0] not in keep:
                    stale.append(key)
            elif rel not in (POINTER, LEASE):
                stale.append(key)
        self.storage._delete_keys(stale)

    def _abort(self, reachable: bool) -> None:
        where = self.storage.join(self.base)
        if not reachable:
            log.warning("note: the unfinished version %s stays until the next commit of %s "
                        "removes it", where, self.storage.join(self.prefix))  # fmt: skip
            return
        try:
            self.storage._delete_keys(self.storage._list(self.base))
        except Exception as exc:
            log.warning("note: could not remove the unfinished version %s (%s); the next "
                        "commit of %s removes it", where, _short(exc),
                        self.storage.join(self.prefix))  # fmt: skip
