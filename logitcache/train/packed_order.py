"""Token-budget rows of an epoch, dealt to ranks by tokens: pure functions of (order, sizes, budget, window,
world), no I/O. Used by :class:`~logitcache.train.dataset.CacheDataset` with ``pack_tokens``.

A sequence's **size** is its input positions ``T = L − 1`` (the tokens it takes in a packed row); the
**budget** ``N`` bounds a row's total size. Three steps:

1. :func:`pack_rows` — the epoch order (:func:`~logitcache.train.partition.epoch_order`, the same for
   every rank) is cut into consecutive **windows** of ``window`` sequences, and each window's sequences are
   packed by best-fit decreasing (:func:`~logitcache.train.packing.plan_bins`) into rows of at most ``N``.
   A window's rows come in the order of their first sequence in the epoch order, each row's sequences in
   epoch order, so a shuffled order stays shuffled row by row (no window starts with its longest
   sequences) and every row draws from ``window`` neighbouring sequences only (the few shards a reader
   holds open). Rows do not depend on the world size.
2. :func:`deal_rows` — the rows are dealt to ranks in **rounds** of ``world_size`` consecutive rows, each
   rank one row per round, so every rank gets the same number of rows (DDP steps in lockstep): within a
   round the row with the most tokens goes to the rank with the fewest tokens so far (ties: lower row
   number, lower rank). The gap between the ranks' token totals then never exceeds the largest gap between
   two rows of one round, at most ``N`` (the gap either stays or is replaced by a smaller one, round after
   round). Uneven row counts are *padded* by repeating rows from the epoch's first (at most
   ``world_size − 1`` rows per epoch), or with ``drop_uneven`` the last ``rows mod world_size`` rows are
   dropped (their sequences are not read this epoch).
3. DataLoader workers: row ``j`` of the rank's rows (after a resume's ``skip``) goes to worker
   ``j mod num_workers`` (:func:`~logitcache.train.partition.worker_share`), the order in which a DataLoader
   with ``batch_size=None`` (or 1) takes elements from its workers, so the loader yields the rank's rows in
   order for any ``num_workers``.

No padding is added inside a row: the cost of packing is the budget a row leaves unused,
``1 − Σ rows' tokens / (rows · N)`` (:func:`unused_budget`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import ConfigError
from ..store.commit import ShardRecord
from .packing import plan_bins

__all__ = ["DEFAULT_PACK_WINDOW", "deal_rows", "one_row", "pack_rows", "packing_sizes", "rank_rows", "record_lengths",
           "shards_per_window", "unused_budget"]

DEFAULT_PACK_WINDOW = 512  # sequences packed together: well mixed rows, a few shards open per reader


def record_lengths(records: Sequence[ShardRecord], seq_len: int, masked: bool) -> np.ndarray | None:
    """``int64[sequences]`` tokens ``L`` of every sequence of ``records`` (in record order) from the manifest
    alone: a packed store's rows all hold ``seq_len + 1``; a documents store lists them per unit
    (``ShardRecord.lengths``). None where a documents unit lists none (a store written before the field)."""
    if not masked:
        return np.full(sum(r.sequences for r in records), seq_len + 1, dtype=np.int64)
    if any(r.lengths is None for r in records):
        return None
    return np.fromiter((n for r in records for n in r.lengths), dtype=np.int64, count=sum(r.sequences for r in records))


def packing_sizes(records: Sequence[ShardRecord], lengths: np.ndarray | None, budget: int, window: int,
                  where: Callable[[int], str]) -> np.ndarray:
    """``int64[sequences]`` each sequence's size (``lengths − 1``), once the budget and the window are valid and
    the budget holds every sequence (else :class:`ConfigError` naming the longest by ``where(index)``)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"pack_tokens must be an int >= 1 (the token budget of one packed row); found {budget!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"pack_window must be an int >= 1 (sequences packed together); found {window!r}")
    if lengths is None:
        missing = [r.index for r in records if r.lengths is None]
        raise ConfigError(f"pack_tokens plans rows from the sequence lengths the manifest records; units {missing[:10]} "
                          "record none (a documents store written before lengths were recorded). Recapture or "
                          "`logitcache convert` the store, or train on padded batches (pack_tokens=None).")
    sizes = lengths - 1
    if sizes.size and int(sizes.max()) > budget:
        longest = int(sizes.argmax())
        raise ConfigError(f"{where(longest)} has {int(sizes[longest])} input positions, more than pack_tokens={budget}; "
                          f"packing never splits a sequence. Pass pack_tokens >= {int(sizes[longest])} (the longest "
                          "sequence of the store), or train on padded batches (pack_tokens=None).")
    return sizes


def pack_rows(order: np.ndarray, sizes: np.ndarray, budget: int, window: int) -> list[np.ndarray]:
    """Rows (``int64[]`` sequence indices each) of ``order``, window by window (module docstring, step 1);
    ``sizes[i]`` is sequence ``i``'s size, every one at most ``budget``."""
    order = np.asarray(order, dtype=np.int64)
    rows: list[np.ndarray] = []
    for lo in range(0, order.size, window):
        block = order[lo:lo + window]
        bins = sorted(plan_bins(sizes[block].tolist(), budget), key=lambda b: b[0])  # by their first sequence
        rows.extend(block[np.asarray(b, dtype=np.int64)] for b in bins)
    return rows


def deal_rows(tokens: Sequence[int], world_size: int, *, drop_uneven: bool) -> np.ndarray:
    """``int64[rounds, world_size]``: entry ``[r, k]`` is the row rank ``k`` reads at its step ``r``, for rows
    of ``tokens[j]`` tokens (module docstring, step 2; padding repeats row numbers from 0)."""
    count = len(tokens)
    rounds = count // world_size if drop_uneven else -(-count // world_size)
    numbers = np.resize(np.arange(count, dtype=np.int64), rounds * world_size) if rounds else np.zeros(0, np.int64)
    weight = np.asarray(tokens, dtype=np.int64)[numbers]
    load = np.zeros(world_size, dtype=np.int64)
    dealt = np.empty((rounds, world_size), dtype=np.int64)
    for r in range(rounds):
        part = slice(r * world_size, (r + 1) * world_size)
        heavy = np.argsort(-weight[part], kind="stable")  # this round's rows, most tokens first
        light = np.argsort(load, kind="stable")  # ranks, fewest tokens so far first
        dealt[r, light] = numbers[part][heavy]
        load[light] += weight[part][heavy]
    return dealt


def rank_rows(order: np.ndarray, sizes: np.ndarray, budget: int, window: int, world_size: int, rank: int, *,
              drop_uneven: bool) -> list[np.ndarray]:
    """The rows rank ``rank`` of ``world_size`` reads this epoch, in reading order (:func:`pack_rows`, then
    :func:`deal_rows`)."""
    rows = pack_rows(order, sizes, budget, window)
    dealt = deal_rows([int(sizes[row].sum()) for row in rows], world_size, drop_uneven=drop_uneven)
    return [rows[j] for j in dealt[:, rank]]


def shards_per_window(order: np.ndarray, starts: np.ndarray, window: int) -> int:
    """The most shards one window of ``order`` draws from (``starts``: each shard's first sequence index, then
    the total): what a reader walking a window's rows keeps open so as to open each shard once."""
    shard_of = np.searchsorted(starts, order, side="right") - 1
    return max((np.unique(shard_of[lo:lo + window]).size for lo in range(0, len(order), window)), default=1)


def one_row(batch: Sequence[dict]) -> dict:
    """The ``collate_fn`` of a loader with ``batch_size=1`` over packed rows (the HF Trainer's): the row itself."""
    if len(batch) != 1:
        raise ConfigError(f"collate_rows takes loader batches of one packed row; found {len(batch)}. With pack_tokens "
                          "use DataLoader(ds, batch_size=None), or batch_size=1 (HF Trainer: "
                          "per_device_train_batch_size=1).")
    return batch[0]


def unused_budget(rows: Sequence[np.ndarray], sizes: np.ndarray, budget: int) -> float:
    """The fraction of ``len(rows) · budget`` that ``rows`` leave unused (0 for no rows)."""
    if not rows:
        return 0.0
    return 1.0 - sum(int(sizes[row].sum()) for row in rows) / (len(rows) * budget)
