"""Store layout, manifest, exactly-once unit commits and the writer lock.

Layout of a store (a local directory or an fsspec URL; the container decides what a unit's
objects hold — see :mod:`logitcache.store.arrow_backend` and :mod:`logitcache.store.zarr_backend`)::

    STORE/
      manifest.json          header (complete=false) at start; final manifest with all units at the end
      shards/00000.arrow     arrow: one object per unit
      data.zarr/...          zarr: group and array metadata, and one shard object per array per unit
      commits/00000.json     one commit record per committed unit, until the manifest is finalised
      .lock                  held by the one writer (host, pid); removed when it finishes

A unit is committed exactly once: each of its objects is written whole (temporary file, fsync,
rename locally; a single PUT on object stores), then its commit record is written the same way.
A unit counts as committed if and only if its record exists and every object it lists exists
with the recorded size; a unit whose objects were written but whose record was not (a crash
between the two) is recomputed and overwritten. Nothing in the store carries a timestamp, so a
resumed capture ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ..errors import StoreError, StoreLockedError, StoreMismatchError, StoreNotFoundError
from ..faults import fault_point
from .manifest import check_manifest, check_shard_entry
from .fs import StoreFS

FORMAT_NAME = "logitcache"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
COMMIT_DIR = "commits"
LOCK = ".lock"


@dataclass(frozen=True)
class ObjectRecord:
    """One object of a unit: path relative to the store root, size and sha256."""

    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest records of one committed unit (its objects, counts and measured error)."""

    index: int
    sequences: int
    positions: int
    entries: int
    objects: tuple[ObjectRecord, ...] = field(default=())
    max_logprob_error: float = 0.0
    max_prob_error: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.objects)

    @property
    def sha256(self) -> str:
        """One digest over the unit's objects (identifies the unit's bytes)."""
        return hashlib.sha256("".join(o.sha256 for o in self.objects).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["objects"] = [dict(o.__dict__) for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        try:
            fields_ = {k: d[k] for k in ("index", "sequences", "positions", "entries")}
            objects = tuple(ObjectRecord(str(o["path"]), int(o["bytes"]), str(o["sha256"])) for o in d["objects"])
            errors = {k: float(d.get(k, 0.0)) for k in ("max_logprob_error", "max_prob_error")}
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"malformed unit record {d!r:.200}: {exc!r}") from exc
        for key, value in fields_.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StoreError(f"unit record field {key!r} must be a non-negative integer; found {value!r}")
        return cls(objects=objects, **fields_, **errors)

    @classmethod
    def build(cls, index: int, sequences: int, positions: int, entries: int, objects: list[tuple[str, bytes]],
              max_logprob_error: float = 0.0, max_prob_error: float = 0.0) -> ShardRecord:
        recs = tuple(ObjectRecord(p, len(b), hashlib.sha256(b).hexdigest()) for p, b in objects)
        return cls(index, sequences, positions, entries, recs, max_logprob_error, max_prob_error)


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def read_json(fs: StoreFS, rel: str, what: str) -> Any:
    try:
        return json.loads(bytes(fs.read(rel)))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise StoreError(f"{what} at {fs.describe(rel)} is unreadable ({exc}); expected JSON written by logitcache. "
                         "Run `logitcache verify` on the store, or recapture with --overwrite.") from exc


def as_fs(root: str | os.PathLike | StoreFS) -> StoreFS:
    return root if isinstance(root, StoreFS) else StoreFS(root)


def read_manifest(root: str | os.PathLike | StoreFS) -> dict[str, Any]:
    """The manifest, checked for format and version; with commit records merged while incomplete."""
    fs = as_fs(root)
    if not fs.exists(MANIFEST):
        raise StoreNotFoundError(f"no logitcache store at {fs.url}: {MANIFEST} is missing. "
                                 "Expected a directory written by `logitcache capture`.")
    path = fs.describe(MANIFEST)
    root = fs.url
    manifest = read_json(fs, MANIFEST, "manifest")
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
            records = read_commits(fs)
        except FileNotFoundError:
            records = None
        if records is None or read_json(fs, MANIFEST, "manifest").get("complete"):  # finalized while we read
            return read_manifest(fs)
        manifest = dict(manifest, shards=[r.to_dict() for r in records])
    check_manifest(manifest, path)
    return manifest


def read_commits(fs: StoreFS) -> list[ShardRecord]:
    """Commit records of the units committed so far, by index."""
    records = [ShardRecord.from_dict(check_shard_entry(read_json(fs, rel, "commit record"), fs.describe(rel)))
               for rel in fs.list(COMMIT_DIR) if rel.endswith(".json")]
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


def begin_store(fs: StoreFS, header: dict[str, Any], static_objects: list[tuple[str, bytes]], *,
                overwrite: bool) -> list[ShardRecord]:
    """Create or reopen a store for writing; returns the already committed units.

    Refuses a store whose recorded identity differs from ``header["identity"]``, naming the
    first differing field. With ``overwrite`` an existing store is removed first.
    ``static_objects`` (container metadata) are written before the header.
    """
    root = fs.url
    remove_temp_files(fs)
    if overwrite and fs.exists(MANIFEST):
        remove_store(fs)
    if fs.exists(MANIFEST):
        existing = read_json(fs, MANIFEST, "manifest")
        for key in ("identity", "teacher", "tokenizer", "corpus", "plan"):
            diff = first_difference(existing.get(key), header.get(key), f"{key}.")
            if diff:
                raise StoreMismatchError(f"store {root} was captured with a different configuration: {diff}. "
                                         "Use the original settings to resume, --overwrite to start over, "
                                         "or another --out.")
        if existing.get("complete"):
            return [ShardRecord.from_dict(r) for r in existing["shards"]]
        for rel, data in static_objects:  # a start killed before they were all written
            if fs.size(rel) != len(data):
                fs.write(rel, data)
        return [r for r in read_commits(fs) if _unit_matches(fs, r)]
    if not fs.is_empty(ignore=(LOCK,)):
        raise StoreError(f"{root} exists, is not empty and holds no {MANIFEST}; expected an empty or new "
                         "directory. Choose another --out or empty it.")
    fs.write(MANIFEST, dump_json(dict(header, complete=False, shards=[])))  # first: a failed start leaves no half store
    for rel, data in static_objects:
        fs.write(rel, data)
    return []


def remove_temp_files(fs: StoreFS) -> None:
    """Delete temp files a killed writer left (``StoreFS.write`` names them ``.NAME.*.tmp``); call under the lock."""
    if fs.remote:
        return  # object stores have no temp files: each object is one PUT
    temps = list(fs.root.glob(f".{MANIFEST}.*.tmp"))
    if fs.exists(MANIFEST):
        temps += [p for sub in STORE_ENTRIES for p in fs.root.joinpath(sub).rglob(".*.tmp")]
    for p in temps:
        p.unlink()


def _unit_matches(fs: StoreFS, record: ShardRecord) -> bool:
    return all(fs.size(o.path) == o.bytes for o in record.objects)


def commit_unit(fs: StoreFS, record: ShardRecord, objects: list[tuple[str, bytes]]) -> None:
    """Write one unit's objects, then its commit record: exactly-once, crash-safe."""
    for rel, data in objects:
        fs.write(rel, data)
    fault_point("after_shard")
    fs.write(f"{COMMIT_DIR}/{record.index:05d}.json", dump_json(record.to_dict()))


def finalize_store(fs: StoreFS, header: dict[str, Any], records: list[ShardRecord]) -> dict[str, Any]:
    """Write the final manifest listing every unit, then drop the commit records.

    Call under the lock with every writer done: temp files a killed worker left mid-write (a Ray
    worker's unit is retried elsewhere, nobody resumes over its leftovers) are swept first.
    """
    remove_temp_files(fs)
    manifest = dict(header, complete=True, shards=[r.to_dict() for r in sorted(records, key=lambda r: r.index)])
    fs.write(MANIFEST, dump_json(manifest))
    fault_point("after_manifest")
    fs.remove(COMMIT_DIR)
    return manifest


STORE_ENTRIES = (SHARD_DIR, COMMIT_DIR, "data.zarr")


def remove_store(fs: StoreFS) -> None:
    """Delete a store's own objects (manifest, units, commits); other content is left alone."""
    for sub in STORE_ENTRIES:
        fs.remove(sub)
    fs.remove(MANIFEST)


class StoreLock:
    """An exclusive writer lock (``STORE/.lock`` holding host and pid).

    A lock left by a dead process on the same host is stale and is taken over; a lock held by
    a live process, or by another host, is refused with its owner named. On object stores the
    lock is advisory: an object is written if none exists (check, then PUT), so two writers
    starting in the same instant could both proceed; one orchestrator per store is the rule
    there (docs/format.md).
    """

    def __init__(self, root: str | os.PathLike | StoreFS):
        self.fs = as_fs(root)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self.path = None if self.fs.remote else self.fs.local_path(LOCK)

    def __enter__(self) -> StoreLock:
        if self.fs.remote:
            if self.fs.exists(LOCK):
                owner = json.loads(bytes(self.fs.read(LOCK)) or b"{}")
                raise StoreLockedError(f"store {self.fs.url} is being written by pid {owner.get('pid')} on host "
                                       f"{owner.get('host')} (lock object {self.fs.describe(LOCK)}). Wait for it to "
                                       "finish; if that process is gone, delete the lock object and resume.")
            self.fs.write(LOCK, json.dumps(self.owner).encode())
            return self
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
        if self.fs.remote:
            self.fs.remove(LOCK)
        else:
            self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
