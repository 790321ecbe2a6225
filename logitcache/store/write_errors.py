"""Turn operating-system errors met while writing a store into one clear :class:`StoreWriteError`.

A failed write never damages a store (every file is written to a temp name and renamed), so the
message can always say the same thing: what happened, what to do, and that rerunning the same
command resumes from the units already committed.

The store's write steps (:mod:`logitcache.store.commit`: the lock, ``begin_store``, ``commit_unit``,
``finalize_store``) carry :func:`translates_write_errors`, so every writer (capture, its Ray workers,
convert) reports a full disk the same way, and an ``OSError`` met outside them (reading a corpus, a
teacher) is not mistaken for a store write.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from ..errors import LogitCacheError, StoreWriteError

P = ParamSpec("P")
R = TypeVar("R")

# errno -> (what happened, what to do)
_EXPLAIN = {
    errno.ENOSPC: ("the disk is full", "free space on it or choose another --out"),
    errno.EDQUOT: ("the disk quota is exhausted", "free space or raise the quota"),
    errno.EFBIG: ("a file exceeded the file-size limit", "raise the limit (ulimit -f) or use smaller shards"),
    errno.EACCES: ("permission denied", "make the store directory writable for this user"),
    errno.EPERM: ("operation not permitted", "make the store directory writable for this user"),
    errno.EROFS: ("the store is on a read-only filesystem", "remount it read-write or choose another --out"),
}


def describe_write_error(exc: OSError, root: str | os.PathLike) -> str:
    """One line: where, what happened, what to do, and that the store is intact and resumable."""
    what, todo = _EXPLAIN.get(exc.errno, (exc.strerror or str(exc), "fix the cause"))
    where = f" ({exc.filename})" if exc.filename else ""
    return (f"cannot write the store {root}: {what}{where}. The store is intact: units committed so far are "
            f"kept. To continue, {todo}, then rerun the same command to resume.")


@contextmanager
def translated_write_errors(root: str | os.PathLike) -> Iterator[None]:
    """Re-raise an ``OSError`` from the listed causes as :class:`StoreWriteError`; others pass through."""
    try:
        yield
    except LogitCacheError:
        raise
    except OSError as exc:
        if exc.errno not in _EXPLAIN:
            raise
        raise StoreWriteError(describe_write_error(exc, root)) from exc


def translates_write_errors(write: Callable[P, R]) -> Callable[P, R]:
    """Decorate a store write step whose first argument is the store's ``StoreFS`` (or an object holding
    it as ``.fs``, such as the lock): OSErrors of the listed causes leave it as :class:`StoreWriteError`."""

    @functools.wraps(write)
    def translated(*args: P.args, **kwargs: P.kwargs) -> R:
        fs = getattr(args[0], "fs", args[0])
        with translated_write_errors(fs.url):
            return write(*args, **kwargs)

    return translated
