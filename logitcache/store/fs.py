"""Where a store's objects live: a local directory or any fsspec URL (``s3://``, ``gcs://``, ``memory://``).

Every object is written whole or not at all:

- local: a temporary file in the same directory, fsync, ``os.replace``, fsync of the directory;
- object stores: one ``PUT`` per object (``fs.pipe_file``). S3, GCS and Azure make an object
  visible only once its upload completes, so a reader sees the old object, no object, or the
  new one — never a prefix. There is no rename, and none is needed: each unit's shard objects
  are written under their final keys *before* its commit record, and a unit counts as committed
  only if the record exists and the objects match its sizes and checksums (docs/format.md).

fsspec is imported only for non-local URLs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..faults import fault_point


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_remote(url: str | os.PathLike) -> bool:
    s = str(url)
    return "://" in s and not s.startswith("file://")


class StoreFS:
    """Byte-level access to the objects under one store root (paths are relative, ``/``-separated)."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        self.url = str(url).rstrip("/")
        self.remote = is_remote(self.url)
        if self.remote:
            import fsspec

            self.fs, self.base = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        else:
            self.fs = None
            self.base = self.url[len("file://"):] if self.url.startswith("file://") else self.url
            self.root = Path(self.base)

    def __repr__(self) -> str:
        return f"StoreFS({self.url!r})"

    def local_path(self, rel: str) -> Path:
        if self.remote:
            raise ValueError(f"{self.url} is not a local store")
        return self.root / rel

    def _key(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def describe(self, rel: str) -> str:
        """The object's full location, for messages."""
        return f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._key(rel)) if self.remote else (self.root / rel).exists()

    def size(self, rel: str) -> int | None:
        """The object's size in bytes, or None when it does not exist."""
        if self.remote:
            try:
                return int(self.fs.size(self._key(rel)))
            except FileNotFoundError:
                return None
        path = self.root / rel
        return path.stat().st_size if path.is_file() else None

    def read(self, rel: str) -> bytes | memoryview:
        """The whole object (memory-mapped when local). Raises FileNotFoundError when missing."""
        if self.remote:
            return self.fs.cat_file(self._key(rel))
        import mmap

        path = self.root / rel
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def write(self, rel: str, data: bytes) -> None:
        """Write one object atomically (see the module docstring)."""
        if self.remote:
            self.fs.pipe_file(self._key(rel), bytes(data))
            return
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                half = len(data) // 2
                f.write(memoryview(data)[:half])
                f.flush()
                fault_point("mid_write", rel)
                f.write(memoryview(data)[half:])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def list(self, prefix: str) -> list[str]:
        """Relative paths of the objects directly under ``prefix`` (sorted; hidden temp files excluded)."""
        if self.remote:
            try:
                names = self.fs.ls(self._key(prefix), detail=False)
            except FileNotFoundError:
                return []
            rels = [n[len(self.base) + 1:] if n.startswith(self.base) else n for n in names]
            return sorted(r for r in rels if not r.rsplit("/", 1)[-1].startswith("."))
        path = self.root / prefix
        if not path.is_dir():
            return []
        return sorted(f"{prefix}/{p.name}" for p in path.iterdir() if p.is_file() and not p.name.startswith("."))

    def remove(self, rel: str) -> None:
        if self.remote:
            if self.fs.exists(self._key(rel)):
                self.fs.rm(self._key(rel), recursive=True)
            return
        path = self.root / rel
        if path.is_dir():
            for child in sorted(path.rglob("*"), reverse=True):
                child.rmdir() if child.is_dir() else child.unlink()
            path.rmdir()
        else:
            path.unlink(missing_ok=True)

    def is_empty(self, ignore: tuple[str, ...] = ()) -> bool:
        if self.remote:
            try:
                names = self.fs.ls(self.base, detail=False)
            except FileNotFoundError:
                return True
            return all(n.rstrip("/").rsplit("/", 1)[-1] in ignore for n in names)
        return not self.root.exists() or all(p.name in ignore for p in self.root.iterdir())
