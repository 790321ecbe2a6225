"""Float columns as byte planes, and the ``label_logprob`` row column (docs/format.md, "Realized-token
log-probabilities").

Floats are stored as byte planes (all first bytes, then all second bytes, …): exponents and signs line
up, which zstd compresses far better (Parquet's BYTE_STREAM_SPLIT).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CorruptShardError, TargetsError
from ..targets import SparseTargets

LABEL_COLUMN = "label_logprob"


def split(values: np.ndarray, dtype: str) -> bytes:
    """``values`` as ``dtype`` byte planes."""
    a = np.ascontiguousarray(values, dtype=dtype)
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.itemsize).T).tobytes()


def unsplit(data: np.ndarray, dtype: str, count: int) -> np.ndarray:
    """The ``count`` values of ``dtype`` that :func:`split` wrote into ``data`` (uint8)."""
    size = np.dtype(dtype).itemsize
    planes = view(data, "u1", count * size).reshape(size, count)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(count)


def view(data: np.ndarray, dtype: str, count: int) -> np.ndarray:
    """``data`` (uint8) as ``count`` values of ``dtype``; CorruptShardError if its size is another."""
    size = np.dtype(dtype).itemsize * count
    if data.size != size:
        raise CorruptShardError(f"column holds {data.size} bytes; {size} expected ({count} × {dtype})")
    return data.view(dtype)


def encode_labels(t: SparseTargets, wanted: bool) -> dict[str, bytes]:
    """``{label_logprob: float32[T] planes}`` when the store keeps the column (``wanted``), else ``{}``;
    TargetsError when the targets and the store disagree, or a value is no log-probability (finite, ≤ 0)."""
    lp = t.label_logprobs
    if wanted != (lp is not None):
        raise TargetsError("the store keeps label_logprob (store.label_logprobs) but the targets carry no "
                           "label_logprobs; capture with label logprobs on" if wanted else
                           "the targets carry label_logprobs but the store does not keep them; write them to a "
                           "store with store.label_logprobs on, or drop them (label_logprobs=None)")
    if lp is None:
        return {}
    values = lp.double().numpy()
    bad = np.flatnonzero(~(np.isfinite(values) & (values <= 0)))
    if bad.size:
        raise TargetsError(f"label_logprobs[{int(bad[0])}] = {float(values[bad[0]])!r}; expected a finite "
                           "log-probability (<= 0) at every position")
    return {LABEL_COLUMN: split(lp.float().numpy(), "<f4")}


def decode_labels(columns: dict[str, np.ndarray], num_positions: int) -> dict[str, torch.Tensor]:
    """``{label_logprobs: float32[T]}`` of a row that has the column, else ``{}``."""
    if LABEL_COLUMN not in columns:
        return {}
    values = unsplit(columns[LABEL_COLUMN], "<f4", num_positions)
    if num_positions and not bool((np.isfinite(values) & (values <= 0)).all()):
        raise CorruptShardError("label_logprob holds a value that is no log-probability (NaN, inf or > 0)")
    return {"label_logprobs": torch.from_numpy(values.astype(np.float32))}
