"""Store directory layout, manifest, exactly-once unit commits and the writer lock.

Layout of a store (format-agnostic; the shard codec decides what a shard file holds)::

    STORE/
      manifest.json          header (complete=false) at start; final manifest with all shards at the end
      shards/00000.arrow     one file per unit of work
      commits/00000.json     one commit record per committed unit, until the manifest is finalised
      .lock                  held by the one writer (host, pid); removed when it finishes

A unit is committed exactly once: its shard is written to a temporary name, fsynced and renamed
into place, then its commit record is written the same way. A unit counts as committed if and
only if its record exists and matches the shard; a shard without a record (a crash between the
two renames) is simply recomputed and overwritten. Nothing in the store carries a timestamp, so
a resumed capture ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..faults import fault_point
from ..manifest_check import check_manifest, check_shard_entry
from ..errors import StoreError, StoreLockedError, StoreMismatchError, StoreNotFoundError

FORMAT_NAME = "logitcache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
COMMIT_DIR = "commits"
LOCK = ".lock"


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest records of one committed unit."""

    index: int
    path: str
    sequences: int
    positions: int
    entries: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def shard_name(index: int, extension: str) -> str:
    return f"{SHARD_DIR}/{index:05d}.{extension}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(memoryview(data)[:half])
            f.flush()
            fault_point("mid_write", f"{path.parent.name}/{path.name}")
            f.write(memoryview(data)[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise StoreError(f"{what} at {path} is unreadable ({exc}); expected JSON written by logitcache. "
                         "Run `logitcache verify` on the store, or recapture with --overwrite.") from exc


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest, checked for format and version; with commit records merged while incomplete."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise StoreNotFoundError(f"no logitcache store at {root}: {MANIFEST} is missing. "
                                 "Expected a directory written by `logitcache capture`.")
    manifest = read_json(path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is not a logitcache manifest (format={manifest.get('format')!r} "
                         f"if a mapping); expected format {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"store {root} has format_version {version!r}; this logitcache reads version "
                         f"{FORMAT_VERSION}. Upgrade logitcache or recapture the store.")
    if not manifest.get("complete"):
        fault_point("reader_commits")
        try:
            records = read_commits(root)
        except FileNotFoundError:
            records = None
        if records is None or read_json(path, "manifest").get("complete"):  # finalized while we read
            return read_manifest(root)
        manifest = dict(manifest, shards=[r.to_dict() for r in records])
    check_manifest(manifest, str(path))
    return manifest


def read_commits(root: Path) -> list[ShardRecord]:
    """Commit records of the units committed so far, by index."""
    records = []
    commit_dir = Path(root) / COMMIT_DIR
    if commit_dir.is_dir():
        for p in sorted(commit_dir.glob("*.json")):
            records.append(ShardRecord.from_dict(check_shard_entry(read_json(p, "commit record"), str(p))))
    return sorted(records, key=lambda r: r.index)


def first_difference(found: Any, expected: Any, prefix: str = "") -> str | None:
    """Dotted name and values of the first field where two config dicts differ, else None."""
    if isinstance(found, dict) and isinstance(expected, dict):
        for key in sorted(set(found) | set(expected)):
            diff = first_difference(found.get(key), expected.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    if found != expected:
        return f"{prefix.rstrip('.')}: store has {found!r}, this run has {expected!r}"
    return None


def begin_store(root: Path, header: dict[str, Any], *, overwrite: bool) -> list[ShardRecord]:
    """Create or reopen a store for writing; returns the already committed units.

    Refuses a store whose recorded identity differs from ``header["identity"]``, naming the
    first differing field. With ``overwrite`` an existing store is removed first.
    """
    remove_temp_files(root)
    if overwrite and (root / MANIFEST).exists():
        remove_store(root)
    if (root / MANIFEST).exists():
        existing = read_json(root / MANIFEST, "manifest")
        for key in ("identity", "teacher", "tokenizer", "corpus", "plan"):
            diff = first_difference(existing.get(key), header.get(key), f"{key}.")
            if diff:
                raise StoreMismatchError(f"store {root} was captured with a different configuration: {diff}. "
                                         "Use the original settings to resume, --overwrite to start over, "
                                         "or another --out.")
        if existing.get("complete"):
            return [ShardRecord.from_dict(r) for r in existing["shards"]]
        return [r for r in read_commits(root) if _shard_matches(root, r)]
    if root.exists() and any(p.name != LOCK for p in root.iterdir()):
        raise StoreError(f"{root} exists, is not empty and holds no {MANIFEST}; expected an empty or new "
                         "directory. Choose another --out or empty it.")
    atomic_write(root / MANIFEST, dump_json(dict(header, complete=False, shards=[])))  # first: a failed start leaves no half store
    (root / SHARD_DIR).mkdir(exist_ok=True)
    (root / COMMIT_DIR).mkdir(exist_ok=True)
    return []


def remove_temp_files(root: Path) -> None:
    """Delete temp files a killed writer left (``atomic_write`` names them ``.NAME.*.tmp``); call under the lock."""
    temps = list(root.glob(f".{MANIFEST}.*.tmp"))
    if (root / MANIFEST).exists():
        temps += [p for sub in (SHARD_DIR, COMMIT_DIR) for p in (root / sub).glob(".*.tmp")]
    for p in temps:
        p.unlink()


def _shard_matches(root: Path, record: ShardRecord) -> bool:
    path = root / record.path
    return path.is_file() and path.stat().st_size == record.bytes


def commit_unit(root: Path, record: ShardRecord, data: bytes) -> None:
    """Write one unit's shard, then its commit record: exactly-once, crash-safe."""
    atomic_write(root / record.path, data)
    fault_point("after_shard")
    atomic_write(root / COMMIT_DIR / f"{record.index:05d}.json", dump_json(record.to_dict()))


def finalize_store(root: Path, header: dict[str, Any], records: list[ShardRecord]) -> dict[str, Any]:
    """Write the final manifest listing every shard, then drop the commit records."""
    manifest = dict(header, complete=True, shards=[r.to_dict() for r in sorted(records, key=lambda r: r.index)])
    atomic_write(root / MANIFEST, dump_json(manifest))
    fault_point("after_manifest")
    _remove_flat_dir(root / COMMIT_DIR)
    return manifest


def remove_store(root: Path) -> None:
    """Delete a store's own files (manifest, shards, commits); refuses foreign content."""
    for sub in (SHARD_DIR, COMMIT_DIR):
        _remove_flat_dir(root / sub)
    (root / MANIFEST).unlink(missing_ok=True)


def _remove_flat_dir(path: Path) -> None:
    """Delete a directory of plain files (shards/ or commits/), if present."""
    if path.is_dir():
        for p in path.iterdir():
            p.unlink()
        path.rmdir()


class StoreLock:
    """An exclusive writer lock (``STORE/.lock`` holding host and pid).

    A lock left by a dead process on the same host is stale and is taken over; a lock held by
    a live process, or by another host, is refused with its owner named.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._take_over_stale():
                    raise
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self
        raise StoreLockedError(f"could not take the lock {self.path}")

    def _take_over_stale(self) -> bool:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        host, pid = owner.get("host"), owner.get("pid")
        if host == self.owner["host"] and isinstance(pid, int) and not _pid_alive(pid):
            self.path.unlink(missing_ok=True)
            return True
        raise StoreLockedError(f"store {self.path.parent} is being written by pid {pid} on host {host} "
                               f"(lock file {self.path}). Wait for it to finish; if that process is gone, "
                               "delete the lock file and resume.")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
