"""One unit's rows as a container decodes them: seq ids plus per-row byte columns (the value every
container in :mod:`logitcache.store.containers` returns, and the ``ans`` stage transforms)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class UnitRows:
    """``seq_ids uint64[R]``; ``columns[name] = (values uint8[...], offsets int64[R + 1])``."""

    seq_ids: np.ndarray
    columns: dict[str, tuple[np.ndarray, np.ndarray]]
    keepalive: Any = None

    def __len__(self) -> int:
        return int(self.seq_ids.size)

    def row(self, r: int) -> dict[str, np.ndarray]:
        return {name: values[off[r]:off[r + 1]] for name, (values, off) in self.columns.items()}


def from_blobs(seq_ids: np.ndarray, columns: dict[str, list[bytes]]) -> UnitRows:
    """Build :class:`UnitRows` from per-row byte strings."""
    out = {}
    for name, blobs in columns.items():
        lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        out[name] = (np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets)
    return UnitRows(np.asarray(seq_ids, dtype=np.uint64), out)

