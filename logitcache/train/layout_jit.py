"""A batch's estimated entries laid out into its ``[B·T, U]`` arrays by one compiled pass (numba, through
:mod:`logitcache.store.jit`: compiled on first use, so importing :mod:`logitcache.train` does not load numba).

Every cell of the arrays is written once (no zero fill first): the ``n`` entries of a stored position go to
``[cell, :n]``, id 0, probability 0 and mask False elsewhere, as :func:`logitcache.train.collate.dense_targets`
documents.
"""

from __future__ import annotations

import numpy as np

from ..store.jit import njit_on_first_use

__all__ = ["lay_out"]


def lay_out(offsets: np.ndarray, ids: np.ndarray, probs: np.ndarray, cells: np.ndarray, out_ids: np.ndarray,
            out_probs: np.ndarray, out_mask: np.ndarray) -> None:
    """Fill ``out_ids`` int64[size, u], ``out_probs`` float32[size, u] and ``out_mask`` bool[size, u]: stored position
    ``i``'s entries ``offsets[i]:offsets[i + 1]`` of ``ids``/``probs`` at cell ``cells[i]`` (ascending, in
    ``[0, size)``); every cell written."""
    _lay_out(offsets, ids, probs, cells, out_ids, out_probs, out_mask)


@njit_on_first_use
def _lay_out(offsets, ids, probs, cells, out_ids, out_probs, out_mask):
    c = 0  # the next stored position
    for cell in range(out_ids.shape[0]):
        n = 0
        if c < cells.size and cells[c] == cell:
            e0 = offsets[c]
            n = offsets[c + 1] - e0
            for j in range(n):
                out_ids[cell, j], out_probs[cell, j], out_mask[cell, j] = ids[e0 + j], probs[e0 + j], True
            c += 1
        for j in range(n, out_ids.shape[1]):
            out_ids[cell, j], out_probs[cell, j], out_mask[cell, j] = 0, 0.0, False
