"""Token-budget rows, their order per epoch and their deal to ranks by tokens: pure functions of (order,
sizes, budget, window, seed, epoch, world), no I/O. Used by :class:`~logitcache.train.dataset.CacheDataset`
with ``pack_tokens``.

A sequence's **size** is its input positions ``T = L − 1`` (the tokens it takes in a packed row); the
**budget** ``N`` bounds a row's total size. Four steps:

1. :func:`plan_rows` — once per dataset: the packing order (the epoch order of epoch 0,
   :func:`~logitcache.train.partition.epoch_order`) is cut into consecutive **windows** of ``window``
   sequences, and each window's sequences are packed by best-fit decreasing
   (:func:`~logitcache.train.packing.plan_bins`) into rows of at most ``N``: a window's rows in the order
   of their first sequence, each row's sequences in order. The rows are the same in every epoch, so
   every epoch has as many rows (trainers such as the HF Trainer count the steps of an epoch once, from
   ``len(dataset)``); the same sequences share a row each epoch (they never attend to each other; they
   share a step's mean loss).
2. :func:`epoch_rows` — each epoch reads the rows in a new order: the windows in a random order, and the
   rows of each window in a random order (``shuffle``; else as planned). A reader walking the rows holds
   open only the shards of one or two windows at a time.
3. :func:`deal_rows` — that order is dealt to ranks in **rounds** of ``world_size`` consecutive rows,
   each rank one row per round, so every rank gets the same number of rows (DDP steps in lockstep): within
   a round the row with the most tokens goes to the rank with the fewest tokens so far (ties: earlier row,
   lower rank). The gap between the ranks' token totals then never exceeds the largest gap between two
   rows of one round, at most ``N`` (each round keeps the gap or replaces it by a smaller one). Uneven row
   counts are *padded* by repeating the epoch's first rows (at most ``world_size − 1`` rows per epoch), or
   with ``drop_uneven`` the last ``rows mod world_size`` rows of the epoch are dropped.
4. DataLoader workers: row ``j`` of the rank's rows (after a resume's ``skip``) goes to worker
   ``j mod num_workers`` (:func:`~logitcache.train.partition.worker_share`): the order in which a
   DataLoader with ``batch_size=None`` (or 1) takes elements from its workers, so the loader yields the
   rank's rows in order for any ``num_workers``.

No padding is added inside a row: what packing costs is the budget a row leaves unused,
``1 − Σ tokens / (rows · N)`` (:func:`unused_budget`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..store.commit import ShardRecord
from .packing import plan_bins
from .partition import generator

__all__ = ["DEFAULT_PACK_WINDOW", "RowPlan", "deal_rows", "epoch_rows", "one_row", "packing_sizes", "plan_rows",
           "rank_rows", "record_lengths", "unused_budget"]

DEFAULT_PACK_WINDOW = 256  # sequences packed together: full rows, and a reader holds a few shards open
ROWS_STREAM = 1  # the random stream of the row order (partition.generator), apart from the epoch order's


@dataclass(frozen=True, eq=False)
class RowPlan:
    """The rows of a dataset: ``rows[j]`` the global sequence indices of row ``j`` (window by window),
    ``windows[w]`` the number of rows of window ``w``, ``tokens[j]`` row ``j``'s size."""

    rows: tuple[np.ndarray, ...]
    windows: tuple[int, ...]
    tokens: np.ndarray

    def shards_per_window(self, starts: np.ndarray) -> int:
        """The most shards the rows of one window draw from (``starts``: each shard's first sequence index,
        then the total): what a reader keeps open so as to open each shard once per window."""
        bounds = np.cumsum([0, *self.windows])
        spans = (np.unique(np.searchsorted(starts, np.concatenate(self.rows[lo:hi]), side="right")).size
                 for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo)
        return max(spans, default=1)


def record_lengths(records: Sequence[ShardRecord], seq_len: int, masked: bool) -> np.ndarray | None:
    """``int64[sequences]`` tokens ``L`` of every sequence of ``records`` (in record order) from the manifest
    alone: a packed store's rows all hold ``seq_len + 1``; a documents store lists them per unit
    (``ShardRecord.lengths``). None where a documents unit lists none (a store written before the field)."""
    count = sum(r.sequences for r in records)
    if not masked:
        return np.full(count, seq_len + 1, dtype=np.int64)
    if any(r.lengths is None for r in records):
        return None
    return np.fromiter((n for r in records for n in r.lengths), dtype=np.int64, count=count)


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
        raise ConfigError(f"pack_tokens plans rows from the sequence lengths the manifest records; units "
                          f"{missing[:10]} record none (a documents store written before lengths were recorded). Recapture or "
                          "`logitcache convert` the store, or train on padded batches (pack_tokens=None).")
    sizes = lengths - 1
    over = np.flatnonzero(sizes > budget)
    if over.size:
        first, longest = int(over[0]), int(sizes.max())
        raise ConfigError(f"{where(first)} has {int(sizes[first])} input positions, more than pack_tokens={budget} "
                          f"({over.size} sequences are); packing never splits a sequence. Pass pack_tokens >= "
                          f"{longest} (the longest sequence of the store), or train on padded batches "
                          "(pack_tokens=None).")
    return sizes


def plan_rows(order: np.ndarray, sizes: np.ndarray, budget: int, window: int) -> RowPlan:
    """The rows of ``order``, window by window (module docstring, step 1); ``sizes[i]`` is sequence ``i``'s
    size, each at most ``budget``."""
    order = np.asarray(order, dtype=np.int64)
    rows: list[np.ndarray] = []
    windows = []
    for lo in range(0, order.size, window):
        block = order[lo:lo + window]
        bins = sorted(plan_bins(sizes[block].tolist(), budget), key=lambda b: b[0])  # by their first sequence
        rows += [block[np.asarray(b, dtype=np.int64)] for b in bins]
        windows.append(len(bins))
    return RowPlan(tuple(rows), tuple(windows), np.asarray([int(sizes[r].sum()) for r in rows], dtype=np.int64))


def epoch_rows(plan: RowPlan, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """``int64[rows]`` the row numbers of ``plan`` in ``epoch``'s order (module docstring, step 2)."""
    if not shuffle:
        return np.arange(len(plan.rows), dtype=np.int64)
    rng = generator(seed, epoch, ROWS_STREAM)
    starts = np.cumsum([0, *plan.windows])
    return np.concatenate([starts[w] + rng.permutation(plan.windows[w]) for w in rng.permutation(len(plan.windows))]
                          or [np.zeros(0, dtype=np.int64)]).astype(np.int64)


def deal_rows(tokens: Sequence[int], world_size: int, *, drop_uneven: bool) -> np.ndarray:
    """``int64[rounds, world_size]``: entry ``[r, k]`` is the position (in ``tokens``' order) of the row rank
    ``k`` reads at its step ``r`` (module docstring, step 3; padding repeats positions from 0)."""
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


def rank_rows(plan: RowPlan, seed: int, epoch: int, shuffle: bool, world_size: int, rank: int, *,
              drop_uneven: bool) -> list[np.ndarray]:
    """The rows rank ``rank`` of ``world_size`` reads in ``epoch``, in reading order (steps 2 and 3)."""
    order = epoch_rows(plan, seed, epoch, shuffle)
    dealt = deal_rows(plan.tokens[order], world_size, drop_uneven=drop_uneven)
    return [plan.rows[j] for j in order[dealt[:, rank]]]


def one_row(batch: Sequence[dict]) -> dict:
    """The ``collate_fn`` of a loader with ``batch_size=1`` over packed rows (the HF Trainer's): the row itself."""
    if len(batch) != 1:
        raise ConfigError(f"collate_rows takes loader batches of one packed row; found {len(batch)}. With pack_tokens "
                          "use DataLoader(ds, batch_size=None), or batch_size=1 (HF Trainer: "
                          "per_device_train_batch_size=1).")
    return batch[0]


def unused_budget(tokens: Sequence[int], budget: int) -> float:
    """The fraction of ``len(tokens) · budget`` that rows of ``tokens`` tokens each leave unused (0 for none)."""
    return 1.0 - float(np.sum(tokens)) / (len(tokens) * budget) if len(tokens) else 0.0
