"""The writer lock of a store, ``STORE/.lock``: one writer at a time, and no process mistakes a lock for its own.

The lock holds its owner (:class:`LockOwner`): host name, pid, a random ``instance`` id drawn per
acquisition, the machine's boot id (``/proc/sys/kernel/random/boot_id``), the owner's start time
(``/proc/<pid>/stat`` field 22) and a ``heartbeat`` time the owner rewrites every
``heartbeat_s`` seconds while it holds the lock. :func:`stale_reason` decides whether a lock found
in place is stale, i.e. its owner is certainly gone:

- same host: another boot id; our own pid but an instance this process does not hold (a restart as
  PID 1 of a new PID namespace reads "its" pid); a dead pid; a live pid that started at another time
  (the pid was reused). A live pid with the recorded start time is a live writer: refused.
- another host (a shared filesystem, an object store written from elsewhere): no pid can be probed,
  so the lease decides: a heartbeat older than ``expiry_s`` is stale; a fresh one, or a lock without
  a heartbeat (written before leases), is refused until it expires or is deleted.

Taking over a stale local lock is serialised by ``flock`` on the store directory: the lock is read,
judged and removed under it, then created with ``O_EXCL`` as any acquisition, so two processes
taking over the same stale lock cannot both end up holding it. On object stores the lock is
advisory (check, PUT, read back; docs/format.md).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

from ..errors import StoreLockedError
from ..faults import fault_point
from .fs import StoreFS
from .write_errors import translates_write_errors

LOCK = ".lock"
HEARTBEAT_S = 30.0
EXPIRY_S = 300.0  # ten missed heartbeats
log = logging.getLogger("logitcache")
_HELD: set[str] = set()  # instances of the locks this process holds now


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks after boot); None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)" start at field 3


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock; fields other than host and pid are None in locks written before they existed."""

    host: str
    pid: int
    instance: str | None = None
    boot_id: str | None = None
    started: int | None = None
    heartbeat: float | None = None

    @classmethod
    def new(cls) -> LockOwner:
        """This process, with a fresh instance id."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, uuid.uuid4().hex, boot_id(), start_time(pid), time.time())

    @classmethod
    def parse(cls, raw: bytes) -> LockOwner | None:
        """The owner a lock's bytes name; None for bytes naming no writer (empty, not JSON, no host or pid)."""
        try:
            d = json.loads(raw)
        except ValueError:
            return None
        if not (isinstance(d, dict) and isinstance(d.get("pid"), int) and isinstance(d.get("host"), str)):
            return None
        kinds = {"instance": str, "boot_id": str, "started": int, "heartbeat": (int, float)}
        extra = {k: d[k] for k, kind in kinds.items() if isinstance(d.get(k), kind)}
        return cls(d["host"], d["pid"], **extra)

    def to_bytes(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}).encode()

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}"


def stale_reason(lock: LockOwner, me: LockOwner, *, now: float, expiry_s: float) -> str | None:
    """Why the owner of ``lock`` is certainly gone, seen from ``me``; None when it may be alive (refuse)."""
    if lock.host != me.host:
        if lock.heartbeat is not None and now - lock.heartbeat > expiry_s:
            return f"its heartbeat is {now - lock.heartbeat:.0f} s old (a lease expires after {expiry_s:.0f} s)"
        return None
    if lock.boot_id and me.boot_id and lock.boot_id != me.boot_id:
        return "it was taken before this machine last booted"
    if lock.pid == me.pid:
        if lock.instance in _HELD:
            return None
        return "it names this process's pid, but this process never took it (a restart in a new PID namespace)"
    if not pid_alive(lock.pid):
        return f"pid {lock.pid} is not running"
    started = start_time(lock.pid)
    if lock.started is not None and started is not None and started != lock.started:
        return f"pid {lock.pid} is another process (started at tick {started}, the owner at tick {lock.started})"
    return None


def _refusal(store: object, owner: LockOwner | None, raw: bytes, kind: str, where: str,
             expiry_s: float) -> StoreLockedError:
    """The refusal of a lock held by ``owner`` (or, None, by a ``kind`` holding ``raw`` that names no writer)."""
    if owner:
        lease = (f"; its heartbeat is {time.time() - owner.heartbeat:.0f} s old, and it is taken over once older "
                 f"than {expiry_s:.0f} s" if owner.heartbeat is not None and owner.host != socket.gethostname()
                 else "")
        return StoreLockedError(f"store {store} is being written by {owner.describe()} ({kind} {where}{lease}). "
                                f"Wait for it to finish; if that process is gone, delete the {kind} and resume.")
    found = "is empty" if not raw.strip() else f"holds {raw[:60]!r}"
    return StoreLockedError(f"store {store} is locked, but its {kind} {where} {found}: it names no writer (expected "
                            "JSON with host and pid), so whether one is alive cannot be told; a capture killed as it "
                            f"took the lock leaves such a {kind}. If no capture is writing this store, delete the "
                            f"{kind} and rerun the same command to resume.")


@contextmanager
def _takeover_guard(directory: Path) -> Iterator[None]:
    """``flock`` on the store directory for the read-judge-remove of a stale lock (where flock works)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock (some network mounts): O_EXCL alone
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


class StoreLock:
    """An exclusive writer lock (``STORE/.lock``, see the module docstring), refreshed by a heartbeat thread.

    Refused with its owner named while that owner may be alive; a stale lock is taken over. If the
    lock is found taken over while held (a stalled owner whose lease expired), the heartbeat stops
    and leaving the ``with`` block raises :class:`StoreLockedError`.
    """

    def __init__(self, root: str | os.PathLike | StoreFS, *, heartbeat_s: float = HEARTBEAT_S,
                 expiry_s: float = EXPIRY_S):
        self.fs = root if isinstance(root, StoreFS) else StoreFS(root)
        self.heartbeat_s, self.expiry_s = heartbeat_s, expiry_s
        self.owner = LockOwner.new()
        self.path = None if self.fs.remote else self.fs.local_path(LOCK)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @translates_write_errors
    def __enter__(self) -> StoreLock:
        if self.fs.remote:
            self._enter_remote()
        else:
            self._enter_local()
        _HELD.add(self.owner.instance)
        self._beat = threading.Thread(target=self._heartbeat, name="logitcache-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _enter_local(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                with _takeover_guard(self.path.parent):
                    self._remove_if_stale()
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(self.owner.to_bytes())
            return
        raise StoreLockedError(f"could not take the lock {self.path}: other writers keep taking it")

    def _enter_remote(self) -> None:
        if self.fs.exists(LOCK):
            self._remove_if_stale()
        self.fs.write(LOCK, self.owner.to_bytes())
        raw = self._read()  # two writers in the same instant: the last PUT wins, the other refuses
        if not self._ours(raw):
            raise self._refused(raw or b"")

    def _read(self) -> bytes | None:
        try:
            return bytes(self.fs.read(LOCK))
        except FileNotFoundError:
            return None

    def _ours(self, raw: bytes | None) -> bool:
        found = LockOwner.parse(raw) if raw is not None else None
        return found is not None and found.instance == self.owner.instance

    def _refused(self, raw: bytes) -> StoreLockedError:
        kind = "lock object" if self.fs.remote else "lock file"
        store = self.fs.url if self.fs.remote else self.path.parent
        return _refusal(store, LockOwner.parse(raw), raw, kind, self.fs.describe(LOCK) if self.fs.remote
                        else str(self.path), self.expiry_s)

    def _remove_if_stale(self) -> None:
        """Remove the lock in place if its owner is gone (logging why); raise the refusal otherwise."""
        raw = self._read()
        if raw is None:
            return  # released since we looked: try again
        owner = LockOwner.parse(raw)
        reason = owner and stale_reason(owner, self.owner, now=time.time(), expiry_s=self.expiry_s)
        if not reason:
            raise self._refused(raw)
        fault_point("lock_takeover")
        log.warning("taking over the stale lock of %s at %s: %s", owner.describe(), self.fs.describe(LOCK), reason)
        self.fs.remove(LOCK)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                raw = self._read()
                if not self._ours(raw):
                    now = "it is gone" if raw is None else f"it now holds {raw[:160]!r}"
                    self.lost = f"the lock {self.fs.describe(LOCK)} was taken from this process as it held it ({now})"
                    return
                self.owner = replace(self.owner, heartbeat=time.time())
                self.fs.write(LOCK, self.owner.to_bytes(), fault_point=False)  # beats come at any time
            except OSError as exc:  # a transient error: the lease allows ten missed beats
                log.warning("could not refresh the lock %s: %s", self.fs.describe(LOCK), exc)

    @translates_write_errors
    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        self._beat.join()
        _HELD.discard(self.owner.instance)
        if self._ours(self._read()):
            self.fs.remove(LOCK)
        if self.lost and exc_type is None:
            raise StoreLockedError(f"{self.lost}; another writer may have written {self.fs.url} meanwhile. "
                                   "Run `logitcache verify` on it, and rerun the capture to resume.")
