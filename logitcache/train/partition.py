"""Epoch order and its partition over ranks and DataLoader workers: pure numpy, no I/O, no globals.

Two steps, each a pure function (anchor: mosaicml/streaming ``partition/``):

1. :func:`epoch_order` — the global order of sequence indices for one epoch, from
   ``(seed, epoch)`` alone (a ``numpy.random.Generator(PCG64)`` seeded with ``SeedSequence([seed,
   epoch])``; the global RNG is never touched).

   Shuffle scheme (locality-preserving, two levels):

   a. **shards**: the shards (runs of consecutive sequence indices, sizes ``shard_sizes``) are put
      in a random order and their index runs concatenated;
   b. **window**: that list is cut into aligned blocks of ``window`` positions and each block is
      permuted on its own.

   Position ``p`` of the order therefore holds a sequence of one of the shards covering positions
   ``[⌊p/window⌋·window, (⌊p/window⌋+1)·window)`` of step (a): any block of ``window`` positions
   draws from at most ``⌈window / s⌉ + 1`` shards (``s`` the smallest shard size among them), and
   every shard occurs within consecutive blocks only. A reader walking a slice of the order in
   order thus holds only a few shards open at a time. Without ``shuffle`` the order is
   ``0, 1, …, n-1``.

2. :func:`partition` — the slice of that order read by one ``(rank, worker)``:

   * **ranks** get contiguous, equal-length slices. When ``n`` is not a multiple of
     ``world_size`` the default *pads*: the order is extended by repeating it from its start until
     every rank has ``⌈n / world_size⌉`` sequences (so DDP ranks take the same number of steps and
     never hang on a collective). Padding repeats at most ``world_size − 1`` sequences per epoch,
     which is within ``world_size · num_workers − 1``. With ``drop_uneven=True`` the last
     ``n mod world_size`` sequences of the order are dropped instead (every rank gets
     ``⌊n / world_size⌋``; over epochs with shuffle, different sequences are dropped).
   * **workers** of one rank take the rank's slice (after skipping the first ``skip`` sequences, a
     resume) in batches of ``batch_size``: batch ``j`` goes to worker ``j mod workers``. A DataLoader
     with ``num_workers = W`` and the same ``batch_size`` collects batch ``j`` from worker
     ``j mod W``, so the loader's output is exactly the rank's slice, in order, whatever ``W`` is.

Across all ``(rank, worker)`` pairs no sequence of the (padded or truncated) order is missed or
repeated.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from .world import World

__all__ = ["epoch_order", "partition", "rank_count", "default_window", "generator", "worker_share"]


def generator(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    """The generator of ``(seed, epoch)``: ``PCG64(SeedSequence([seed, epoch, *stream]))``; another ``stream``
    (e.g. the order of packed rows) draws independently of the epoch order (no ``stream``)."""
    if seed < 0 or epoch < 0:
        raise ConfigError(f"seed and epoch must be >= 0; found seed={seed}, epoch={epoch}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), *stream])))


def default_window(shard_sizes: Sequence[int]) -> int:
    """The default shuffle window: twice the largest shard (each block mixes about 2–3 shards)."""
    return 2 * max(shard_sizes, default=1) or 1


def epoch_order(num_sequences: int, seed: int, epoch: int, shuffle: bool, *,
                shard_sizes: Sequence[int] | None = None, window: int | None = None) -> np.ndarray:
    """``int64[num_sequences]`` global order of sequence indices for ``epoch`` (see module docstring).

    ``shard_sizes`` (sequences per shard, in index order) must sum to ``num_sequences``; ``None``
    treats the store as one shard. ``window`` defaults to :func:`default_window` of the shard sizes
    when they are given, else to the whole order (a full permutation).
    """
    if num_sequences < 0:
        raise ConfigError(f"num_sequences must be >= 0; found {num_sequences}")
    if not shuffle:
        return np.arange(num_sequences, dtype=np.int64)
    rng = generator(seed, epoch)
    sizes = np.asarray([num_sequences] if shard_sizes is None else list(shard_sizes), dtype=np.int64)
    if int(sizes.sum()) != num_sequences or (sizes < 0).any():
        raise ConfigError(f"shard_sizes sum to {int(sizes.sum())}; expected num_sequences={num_sequences} "
                          "(one non-negative size per shard)")
    if window is None:
        window = default_window(sizes.tolist()) if shard_sizes is not None else max(1, num_sequences)
    if window < 1:
        raise ConfigError(f"window must be >= 1; found {window}")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    shard_perm = rng.permutation(sizes.size)
    order = np.concatenate([np.arange(starts[s], starts[s] + sizes[s], dtype=np.int64) for s in shard_perm]
                           or [np.zeros(0, dtype=np.int64)])
    for lo in range(0, num_sequences, window):
        block = order[lo:lo + window]
        order[lo:lo + window] = block[rng.permutation(block.size)]
    return order


def rank_count(num_sequences: int, world_size: int, *, drop_uneven: bool) -> int:
    """Sequences each rank reads per epoch: ``⌊n/ws⌋`` with ``drop_uneven``, else ``⌈n/ws⌉``."""
    return num_sequences // world_size if drop_uneven else math.ceil(num_sequences / world_size)


def partition(order: np.ndarray, world: World, *, drop_uneven: bool = False, batch_size: int = 1,
              skip: int = 0) -> np.ndarray:
    """``int64[]`` the part of ``order`` that ``world``'s ``(rank, worker)`` reads, in reading order.

    Ranks: contiguous equal slices; uneven ``len(order)`` is padded by repeating the order from its
    start (at most ``world_size − 1``, so at most ``world_size·num_workers − 1``, repeats per
    epoch) or, with ``drop_uneven``, truncated. Workers: the rank's slice minus its first ``skip``
    sequences, in batches of ``batch_size``, batch ``j`` to worker ``j mod workers`` — the order in
    which a DataLoader with that ``batch_size`` round-robins over its workers.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; found {batch_size}")
    order = np.asarray(order, dtype=np.int64)
    per_rank = rank_count(order.size, world.world_size, drop_uneven=drop_uneven)
    if not 0 <= skip <= per_rank:
        raise ConfigError(f"skip must be in [0, {per_rank}] (sequences per rank); found {skip}")
    full = np.resize(order, per_rank * world.world_size) if per_rank else order[:0]
    mine = full[world.rank * per_rank:(world.rank + 1) * per_rank]
    return mine[worker_share(mine.size, world, batch_size=batch_size, skip=skip)]


def worker_share(count: int, world: World, *, batch_size: int = 1, skip: int = 0) -> np.ndarray:
    """``int64[]`` the positions of a rank's ``count`` elements (sequences, or packed rows) that ``world``'s
    worker reads: positions from ``skip`` on, in batches of ``batch_size``, batch ``j`` to worker
    ``j mod workers``."""
    positions = np.arange(skip, count, dtype=np.int64)
    return positions[(positions - skip) // batch_size % world.workers == world.worker_id]
