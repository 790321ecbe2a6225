"""Where a store's objects live: a local directory or any fsspec URL (``s3://``, ``gcs://``, ``memory://``).

Every object is written whole or not at all:

- local: a temporary file in the same directory, fsync, ``os.replace``, fsync of the directory;
- object stores: one ``PUT`` per object (``fs.pipe_file``). S3, GCS and Azure make an object
  visible only once its upload completes, so a reader sees the old object, no object, or the
  new one — never a prefix. There is no rename, and none is needed: each unit's shard objects
  are written under their final keys *before* its commit record, and a unit counts as committed
  only if the record exists and the objects match its sizes and checksums (docs/format.md).

``StoreFS(url)`` builds the implementation the URL needs: :class:`LocalFS` for a path or a
``file://`` URL, :class:`FsspecFS` (fsspec imported only then) for any other URL.
"""

from __future__ import annotations

import abc
import mmap
import os
import tempfile
from pathlib import Path

from ..errors import StoreError
from ..faults import fault_point as _fault_point


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_remote(url: str | os.PathLike) -> bool:
    s = str(url)
    return "://" in s and not s.startswith("file://")


class StoreFS(abc.ABC):
    """Byte-level access to the objects under one store root (paths are relative, ``/``-separated)."""

    remote: bool  # True where objects live behind fsspec: no local paths, no rename, no file locks

    def __new__(cls, url: str | os.PathLike = "", storage_options: dict | None = None):
        # StoreFS(url) picks the implementation; an implementation (or unpickling one) builds itself
        if cls is StoreFS:
            cls = FsspecFS if is_remote(url) else LocalFS
        return super().__new__(cls)

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        self.url = str(url).rstrip("/")

    def __repr__(self) -> str:
        return f"StoreFS({self.url!r})"

    def describe(self, rel: str) -> str:
        """The object's full location, for messages."""
        return f"{self.url}/{rel}"

    @abc.abstractmethod
    def local_path(self, rel: str) -> Path:
        """The object's path on this machine; only for a local store."""

    @abc.abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abc.abstractmethod
    def size(self, rel: str) -> int | None:
        """The object's size in bytes, or None when it does not exist."""

    @abc.abstractmethod
    def read(self, rel: str) -> bytes | memoryview:
        """The whole object. Raises FileNotFoundError when missing."""

    @abc.abstractmethod
    def write(self, rel: str, data: bytes, *, fault_point: bool = True) -> None:
        """Write one object atomically (see the module docstring). ``fault_point=False`` leaves out the
        ``mid_write`` fault point, for writes whose timing is not deterministic (the lock's heartbeat), so
        a fault plan counting ``mid_write`` hits never lands on one of them."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Relative paths of the objects directly under ``prefix`` (sorted; hidden temp files excluded)."""

    @abc.abstractmethod
    def remove(self, rel: str) -> None:
        """Delete an object, or a prefix with everything under it; nothing when absent."""

    @abc.abstractmethod
    def is_empty(self, ignore: tuple[str, ...] = ()) -> bool:
        """Whether the root holds nothing but entries named in ``ignore``."""


class LocalFS(StoreFS):
    """A directory on this machine (a path or a ``file://`` URL): temp file, fsync, rename."""

    remote = False

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        super().__init__(url)
        self.root = Path(self.url.removeprefix("file://"))

    def local_path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def size(self, rel: str) -> int | None:
        path = self.root / rel
        return path.stat().st_size if path.is_file() else None

    def read(self, rel: str) -> bytes | memoryview:
        """The whole object, memory-mapped. Raises FileNotFoundError when missing."""
        with open(self.root / rel, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def write(self, rel: str, data: bytes, *, fault_point: bool = True) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                half = len(data) // 2
                f.write(memoryview(data)[:half])
                f.flush()
                if fault_point:
                    _fault_point("mid_write", rel)
                f.write(memoryview(data)[half:])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def list(self, prefix: str) -> list[str]:
        path = self.root / prefix
        if not path.is_dir():
            return []
        return sorted(f"{prefix}/{p.name}" for p in path.iterdir() if p.is_file() and not p.name.startswith("."))

    def remove(self, rel: str) -> None:
        path = self.root / rel
        if path.is_dir():
            for child in sorted(path.rglob("*"), reverse=True):
                child.rmdir() if child.is_dir() else child.unlink()
            path.rmdir()
        else:
            path.unlink(missing_ok=True)

    def is_empty(self, ignore: tuple[str, ...] = ()) -> bool:
        return not self.root.exists() or all(p.name in ignore for p in self.root.iterdir())


class FsspecFS(StoreFS):
    """Any fsspec URL (``s3://``, ``gcs://``, ``memory://``): one ``PUT`` per object."""

    remote = True

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        import fsspec

        super().__init__(url)
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **(storage_options or {}))

    def _key(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def local_path(self, rel: str) -> Path:
        raise StoreError(f"{self.url} is not a local store; this needs a store on a local filesystem path")

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._key(rel))

    def size(self, rel: str) -> int | None:
        try:
            return int(self.fs.size(self._key(rel)))
        except FileNotFoundError:
            return None

    def read(self, rel: str) -> bytes | memoryview:
        return self.fs.cat_file(self._key(rel))

    def write(self, rel: str, data: bytes, *, fault_point: bool = True) -> None:
        self.fs.pipe_file(self._key(rel), bytes(data))

    def list(self, prefix: str) -> list[str]:
        try:
            names = self.fs.ls(self._key(prefix), detail=False)
        except FileNotFoundError:
            return []
        rels = [n[len(self.base) + 1:] if n.startswith(self.base) else n for n in names]
        return sorted(r for r in rels if not r.rsplit("/", 1)[-1].startswith("."))

    def remove(self, rel: str) -> None:
        if self.fs.exists(self._key(rel)):
            self.fs.rm(self._key(rel), recursive=True)

    def is_empty(self, ignore: tuple[str, ...] = ()) -> bool:
        try:
            names = self.fs.ls(self.base, detail=False)
        except FileNotFoundError:
            return True
        return all(n.rstrip("/").rsplit("/", 1)[-1] in ignore for n in names)
