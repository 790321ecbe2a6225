"""Store layout, manifest and exactly-once unit commits (the writer lock is :mod:`.lock`).

Layout of a store (a local directory or an fsspec URL; the container decides what a unit's
objects hold — see :mod:`logitcache.store.containers.arrow` and :mod:`logitcache.store.containers.zarr`)::

    STORE/
      manifest.json          header (complete=false) at start; final manifest with all units at the end
      shards/00000.arrow     arrow: one object per unit
      data.zarr/...          zarr: group and array metadata, and one shard object per array per unit
      commits/00000.json     one commit record per committed unit, until the manifest is finalised
      .lock                  held by the one writer (its owner, see :mod:`.lock`); removed when it finishes

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
from typing import Any

from ..errors import StoreError, StoreMismatchError, StoreNotFoundError
from ..faults import fault_point
from .manifest import HEADER_DIGEST, Manifest, ManifestHeader, ShardRecord
from .fs import StoreFS
from .lock import LOCK
from .write_errors import translates_write_errors

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
COMMIT_DIR = "commits"


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


def read_manifest(root: str | os.PathLike | StoreFS) -> Manifest:
    """The manifest, checked (:meth:`Manifest.from_dict`); with commit records merged while incomplete."""
    fs = as_fs(root)
    if not fs.exists(MANIFEST):
        raise StoreNotFoundError(f"no logitcache store at {fs.url}: {MANIFEST} is missing. "
                                 "Expected a directory written by `logitcache capture`.")
    manifest = _load_manifest(fs)
    if not manifest.complete:
        fault_point("reader_commits")
        try:
            records = read_commits(fs)
        except FileNotFoundError:
            records = None
        if records is None or _load_manifest(fs).complete:  # finalized while we read
            return read_manifest(fs)
        manifest = manifest.with_shards(records, fs.describe(MANIFEST))
    return manifest


def _load_manifest(fs: StoreFS) -> Manifest:
    return Manifest.from_dict(read_json(fs, MANIFEST, "manifest"), fs.describe(MANIFEST))


def read_commits(fs: StoreFS) -> list[ShardRecord]:
    """Commit records of the units committed so far, by index."""
    records = [ShardRecord.from_dict(read_json(fs, rel, "commit record"), fs.describe(rel))
               for rel in fs.list(COMMIT_DIR) if rel.endswith(".json")]
    return sorted(records, key=lambda r: r.index)


@translates_write_errors
def begin_store(fs: StoreFS, header: ManifestHeader, static_objects: list[tuple[str, bytes]], *,
                overwrite: bool) -> list[ShardRecord]:
    """Create or reopen a store for writing; returns the already committed units.

    Refuses a store whose recorded identity (or teacher, tokenizer, corpus, plan) differs from
    ``header``'s, naming the first differing field. With ``overwrite`` an existing store is removed first.
    ``static_objects`` (container metadata) are written before the header.
    """
    root = fs.url
    remove_temp_files(fs)
    if overwrite and fs.exists(MANIFEST):
        remove_store(fs)
    if fs.exists(MANIFEST):
        existing = _load_manifest(fs)
        diff = existing.header.first_difference(header)
        if diff:
            raise mismatch_error(root, diff)
        if existing.complete:
            return list(existing.shards)
        for rel, data in static_objects:  # a start killed before they were all written
            if fs.size(rel) != len(data):
                fs.write(rel, data)
        digest = header.to_dict()[HEADER_DIGEST]
        return [r for r in read_commits(fs) if _unit_matches(fs, r, digest)]
    if not fs.is_empty(ignore=(LOCK,)):
        raise StoreError(f"{root} exists, is not empty and holds no {MANIFEST}; expected an empty or new "
                         "directory. Choose another --out or empty it.")
    fs.write(MANIFEST, dump_json(Manifest(header).to_dict()))  # first: a failed start leaves no half store
    for rel, data in static_objects:
        fs.write(rel, data)
    return []


def mismatch_error(root: str, diff: str) -> StoreMismatchError:
    """The refusal of a resume whose configuration differs (``diff``: the first differing field)."""
    return StoreMismatchError(f"store {root} was captured with a different configuration: {diff}. "
                              "Use the original settings to resume, --overwrite to start over, or another --out.")


def remove_temp_files(fs: StoreFS) -> None:
    """Delete temp files a killed writer left (``StoreFS.write`` names them ``.NAME.*.tmp``); call under the lock."""
    if fs.remote:
        return  # object stores have no temp files: each object is one PUT
    temps = [p for name in (MANIFEST, LOCK) for p in fs.root.glob(f".{name}.*.tmp")]
    if fs.exists(MANIFEST):
        temps += [p for sub in STORE_ENTRIES for p in fs.root.joinpath(sub).rglob(".*.tmp")]
    for p in temps:
        p.unlink(missing_ok=True)  # (our own lock heartbeat may be renaming its temp file right now)


def _unit_matches(fs: StoreFS, record: ShardRecord, header_sha256: str) -> bool:
    """A commit record counts if it is bound to this store (one from another store, or written before
    bindings, is recomputed) and every object it lists is in place with its size."""
    return record.binding == record.binding_for(header_sha256) and all(fs.size(o.path) == o.bytes
                                                                      for o in record.objects)


@translates_write_errors
def commit_unit(fs: StoreFS, record: ShardRecord, objects: list[tuple[str, bytes]]) -> None:
    """Write one unit's objects, then its commit record: exactly-once, crash-safe."""
    for rel, data in objects:
        fs.write(rel, data)
    fault_point("after_shard")
    fs.write(f"{COMMIT_DIR}/{record.index:05d}.json", dump_json(record.to_dict()))


@translates_write_errors
def finalize_store(fs: StoreFS, header: ManifestHeader, records: list[ShardRecord]) -> Manifest:
    """Write the final manifest listing every unit, then drop the commit records.

    Call under the lock with every writer done: temp files a killed worker left mid-write (a Ray
    worker's unit is retried elsewhere, nobody resumes over its leftovers) are swept first.
    """
    remove_temp_files(fs)
    manifest = Manifest(header, complete=True, shards=tuple(sorted(records, key=lambda r: r.index)))
    fs.write(MANIFEST, dump_json(manifest.to_dict()))
    fault_point("after_manifest")
    fs.remove(COMMIT_DIR)
    return manifest


STORE_ENTRIES = (SHARD_DIR, COMMIT_DIR, "data.zarr")


def remove_store(fs: StoreFS) -> None:
    """Delete a store's own objects (manifest, units, commits); other content is left alone."""
    for sub in STORE_ENTRIES:
        fs.remove(sub)
    fs.remove(MANIFEST)
