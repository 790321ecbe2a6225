"""A batch's estimated entries laid out into its ``[B·T, U]`` arrays by one compiled pass (numba, through
:mod:`logitcache.store.jit`: compiled on first use, so importing :mod:`logitcache.train` does not load numba).

Every cell of the arrays is written once (no zero fill first): a stored position's ``k`` head entries go to
``[cell, :k]`` and its ``n`` sampled entries to ``[cell, k:k + n]`` — the order of
:meth:`~logitcache.targets.SparseTargets.estimate`, taken from :meth:`~logitcache.targets.SparseTargets.estimate_parts`
without interleaving them first — and id 0, probability 0 and mask False elsewhere, as
:func:`logitcache.train.collate.dense_targets` documents.
"""

from __future__ import annotations

import numpy as np

from ..store.jit import njit_on_first_use

__all__ = ["lay_out"]


def lay_out(head_ids: np.ndarray | None, head_probs: np.ndarray | None, offsets: np.ndarray, ids: np.ndarray,
            probs: np.ndarray, cells: np.ndarray, out_ids: np.ndarray, out_probs: np.ndarray,
            out_mask: np.ndarray) -> None:
    """Fill ``out_ids`` int64[size, u], ``out_probs`` float32[size, u] and ``out_mask`` bool[size, u]: stored position
    ``i``'s head ``head_ids[i]``/``head_probs[i]`` (int64/float32 ``[P, k]``; ``None``: no head), then its sampled
    entries ``offsets[i]:offsets[i + 1]`` of ``ids``/``probs``, at cell ``cells[i]`` (ascending, in ``[0, size)``);
    every cell written."""
    if head_ids is None:
        head_ids, head_probs = np.zeros((cells.size, 0), np.int64), np.zeros((cells.size, 0), np.float32)
    _lay_out(np.ascontiguousarray(head_ids), np.ascontiguousarray(head_probs), offsets, ids, probs, cells, out_ids,
             out_probs, out_mask)


@njit_on_first_use
def _lay_out(head_ids, head_probs, offsets, ids, probs, cells, out_ids, out_probs, out_mask):
    c, k = 0, head_ids.shape[1]  # the next stored position; head entries per position
    for cell in range(out_ids.shape[0]):
        n = 0
        if c < cells.size and cells[c] == cell:
            for j in range(k):
                out_ids[cell, j], out_probs[cell, j], out_mask[cell, j] = head_ids[c, j], head_probs[c, j], True
            e0 = offsets[c]
            n = offsets[c + 1] - e0
            for j in range(n):
                out_ids[cell, k + j], out_probs[cell, k + j], out_mask[cell, k + j] = ids[e0 + j], probs[e0 + j], True
            n += k
            c += 1
        for j in range(n, out_ids.shape[1]):
            out_ids[cell, j], out_probs[cell, j], out_mask[cell, j] = 0, 0.0, False
