"""Stream a store to a student trainer: :class:`CacheDataset` (training) and :class:`CacheView` (evaluation).

Items are ``{"seq_id": int, "input_ids": int64[T], "labels": int64[T], "targets": SparseTargets}``
(``input_ids = tokens[:-1]``, ``labels = tokens[1:]``). A ``documents`` store (chat conversations,
documents of their own length) adds ``"loss_mask": bool[T]``, the row's train mask: ``labels`` is
``-100`` where it is 0, and ``targets`` covers only the ``loss_mask.sum()`` trained positions, in order.
A store captured with ``--label-logprobs`` gives ``targets.label_logprobs`` (each label's exact teacher
log-probability, what :mod:`logitcache.train.cross_tokenizer` merges groups with); other stores None.
Batch items with ``ds.collate`` (:func:`logitcache.train.collate.collate`: padded ``[B, T]``) or
``ds.collate_packed`` (:func:`logitcache.train.packing.pack`: the loader's ``B`` sequences in one
padding-free row ``[1, total]``; feed the student :func:`logitcache.train.packing.model_inputs`).

Token-budget rows (``pack_tokens=N``): each element yielded is already one padding-free row of at most
``N`` input positions (the :func:`~logitcache.train.packing.pack` layout, with ``seq_ids``), for
``DataLoader(ds, batch_size=None)`` (or ``batch_size=1``, ``collate_fn=ds.collate_rows``). The rows, and
which rank reads each (as many on every rank, balanced by tokens), are :mod:`logitcache.train.packed_order`
of the lengths the manifest records. Below, read "row" for "sequence" and ``batch_size = 1``.

Reading is lazy: a shard is read only when a reader first needs one of its rows, its checksum is
verified then (``verify=True``; a mismatch raises :class:`CorruptShardError` naming the shard, before any
of its rows is decoded or yielded), all its rows are decoded at once (:mod:`logitcache.store.unit_decode`),
and a few recently used shards are kept decoded.

Order and resume. The epoch order is :func:`logitcache.train.partition.epoch_order` of ``(seed, epoch)``;
each rank reads a contiguous slice of it (:func:`logitcache.train.partition.partition`). When the dataset
knows the DataLoader's ``batch_size``, its workers hand out whole batches in the loader's own
round-robin (batch ``j`` from worker ``j mod num_workers``), so the loader yields the rank's slice
*exactly in order*, for any ``num_workers``. A checkpoint therefore needs one number, the
sequences consumed so far. :meth:`CacheDataset.state_dict` gives it when this process can see it and
refuses when it cannot, never an epoch-start state for a mid-epoch call: the main process that iterated
the dataset counts what it yielded (anything reading ahead of the training step, like Accelerate's
``DataLoaderShard``, counts too: then pass ``batches_consumed``); once DataLoader workers have read it
(they raise a flag shared across processes before their first batch) the main process cannot see how far
they got and raises :class:`~logitcache.errors.ConfigError`; inside a worker (where torchdata's
``StatefulDataLoader`` calls it) it gives that worker's own *worker state* (``state["worker"]``), which
only the same worker of a loader with as many workers loads back. ``state_dict(batches_consumed=k)``
states the position itself: ``k`` batches taken from the loader (docs/training.md, "Checkpoint and
resume"). Contract: resume is exact when the state is taken at a batch boundary and the same
``batch_size`` is used (``num_workers`` may change, except for a worker state). The position applies to the epoch
in the state until :meth:`CacheDataset.set_epoch` moves to another epoch.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .collate import collate as _collate
from ..errors import ConfigError
from .packed_order import DEFAULT_PACK_WINDOW, RowPlan, one_row, packing_sizes, plan_rows, rank_rows
from .packing import pack
from .partition import default_window, epoch_order, partition, rank_count, worker_share
from .resume_state import READ_BY_WORKERS, Pass, validate_state, worker_offset
from .store_reads import Store
from .world import World, detect_world

__all__ = ["CacheDataset", "CacheView", "STATE_VERSION"]

STATE_VERSION = 1


class CacheDataset(IterableDataset):
    """A store as a streaming training dataset (see the module docstring for order and resume).

    Args:
        path: the store directory.
        shuffle: shuffle shards, then sequences within a window (:func:`logitcache.train.partition.epoch_order`).
        seed, epoch: fix the order; :meth:`set_epoch` changes the epoch.
        world: rank and world size; ``None`` detects them (:func:`logitcache.train.world.detect_world`).
            DataLoader workers are always taken from ``get_worker_info()`` when iterating inside one.
        drop_uneven: drop the ``n mod world_size`` remainder instead of padding by repetition.
        verify: check each shard's sha256 the first time this process opens it.
        tokenizer_fingerprint: the student tokenizer's fingerprint, or the forms
            :func:`~logitcache.models.tokenizers.tokenizer_fingerprints` gives; refused unless the store's is one.
        batch_size: the DataLoader's batch size; needed for mid-epoch state with ``num_workers > 1``.
        shuffle_window: window of the in-window shuffle (default twice the largest shard).
        cache_shards: shards kept open per reader (with ``pack_tokens``, at least those one window spans).
        pack_tokens: yield padding-free rows of at most this many input positions instead of sequences
            (module docstring; :mod:`logitcache.train.packed_order`); a longer sequence is refused here.
        pack_window: sequences packed together (consecutive in the epoch order).
        on_corrupt: ``"raise"`` (default): a bad shard raises :class:`CorruptShardError` naming it, before
            any of its rows is yielded. ``"skip"``: every shard is checked when the dataset is built
            (checksums, row count) and bad ones are left out of the epoch, logged as warnings and
            listed in :attr:`corrupt_shards`. Either way no row of a bad shard is ever yielded.
    """

    collate = staticmethod(_collate)
    collate_packed = staticmethod(pack)
    collate_rows = staticmethod(one_row)

    def __init__(self, path: str | os.PathLike, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                 world: World | None = None, drop_uneven: bool = False, verify: bool = True,
                 tokenizer_fingerprint: str | Collection[str] | None = None, batch_size: int | None = None,
                 shuffle_window: int | None = None, cache_shards: int = 4, on_corrupt: str = "raise",
                 pack_tokens: int | None = None, pack_window: int = DEFAULT_PACK_WINDOW) -> None:
        super().__init__()
        self._store = Store(path, verify=verify, tokenizer_fingerprint=tokenizer_fingerprint,
                             cache_shards=cache_shards, on_corrupt=on_corrupt)
        self.path = str(path)
        self.shuffle, self.seed, self.drop_uneven = bool(shuffle), int(seed), bool(drop_uneven)
        self.world = (world or detect_world()).with_worker(0, 0)
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 or None; found {batch_size}")
        self.shuffle_window = int(shuffle_window or default_window(self._store.sizes))
        self.pack_tokens, self.pack_window = pack_tokens, (None if pack_tokens is None else pack_window)
        self.batch_size = batch_size if pack_tokens is None else self._plan_rows(batch_size)
        self._packed: tuple[tuple[int, int, int], list[np.ndarray]] | None = None  # (epoch, rank, world), rows
        # set by any DataLoader worker that starts reading this dataset; shared with the worker processes
        self._read_by_workers = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.epoch = -1  # no epoch yet: set_epoch starts one
        self.set_epoch(epoch)

    @property
    def num_sequences(self) -> int:
        """Sequences in the store (committed shards)."""
        return self._store.num_sequences

    @property
    def corrupt_shards(self) -> list[str]:
        """One line per shard left out by ``on_corrupt="skip"`` (what was wrong with it)."""
        return list(self._store.skipped)

    @property
    def skipped_shards(self) -> int:
        """How many shards ``on_corrupt="skip"`` left out."""
        return len(self._store.skipped)

    @property
    def store_fingerprint(self) -> str:
        """sha256 over the shards' sha256 checksums, in manifest order."""
        return self._store.fingerprint

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next. Another epoch starts from its beginning; the current epoch keeps its
        position (a state loaded by :meth:`load_state_dict`), so a trainer that calls ``set_epoch(epoch)``
        at every epoch start (the HF Trainer, Accelerate's loaders) does not undo a resume."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0; found {epoch}")
        if int(epoch) != self.epoch:
            self._begin(int(epoch), skip=0)

    def _begin(self, epoch: int, skip: int, resume_offset: int = 0) -> None:
        """Stand ``skip`` sequences into ``epoch`` (plus ``resume_offset`` of this worker's own sequences,
        from a worker state) with nothing read since; only the main process clears the workers' flag."""
        self.epoch, self._skip, self._resume_offset = epoch, skip, resume_offset
        self._pass: Pass | None = None  # the latest pass over the dataset in this process
        if get_worker_info() is None:
            self._read_by_workers.zero_()

    def _plan_rows(self, batch_size: int | None) -> int:
        """Plan the rows (:func:`~logitcache.train.packed_order.plan_rows`, from the lengths the manifest records)
        and size the shard cache to one window's shards; returns 1, the batch size of a loader of rows."""
        if batch_size not in (None, 1):
            raise ConfigError(f"batch_size: found {batch_size}, expected None or 1 with pack_tokens (each element is "
                              "already a packed row): DataLoader(ds, batch_size=None), or batch_size=1 with "
                              "collate_fn=ds.collate_rows (the HF Trainer: per_device_train_batch_size=1)")
        sizes = packing_sizes(self._store.records, self._store.lengths, self.pack_tokens, self.pack_window,
                              self._store.where)
        self._plan: RowPlan = plan_rows(self.order(0), sizes, self.pack_tokens, self.pack_window)
        self._store.cache_shards = max(self._store.cache_shards, self._plan.shards_per_window(self._store.starts))
        return 1

    def __len__(self) -> int:
        """Sequences (with ``pack_tokens``: packed rows) this rank yields per epoch, all its workers together."""
        count = self.num_sequences if self.pack_tokens is None else len(self._plan.rows)
        return rank_count(count, self.world.world_size, drop_uneven=self.drop_uneven)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """``int64[]`` global order of sequence indices of ``epoch`` (default: the current epoch)."""
        return epoch_order(self.num_sequences, self.seed, self.epoch if epoch is None else epoch, self.shuffle,
                           shard_sizes=self._store.sizes, window=self.shuffle_window)

    def indices(self, world: World | None = None) -> np.ndarray:
        """``int64[]`` global sequence indices ``world`` reads this epoch (default: this process), in order
        (with ``pack_tokens``: its :meth:`rows` end to end)."""
        world = world or self._reader_world()
        if self.pack_tokens is not None:
            return np.concatenate([np.zeros(0, dtype=np.int64), *self.rows(world)])
        return partition(self.order(), world, drop_uneven=self.drop_uneven, batch_size=self.batch_size or 1,
                         skip=self._skip)

    def rows(self, world: World | None = None) -> list[np.ndarray]:
        """With ``pack_tokens``: the packed rows (global sequence indices each) ``world`` reads this epoch."""
        world = world or self._reader_world()
        rows = self._rank_rows(self.epoch, world)
        return [rows[j] for j in worker_share(len(rows), world, skip=self._skip)]

    def _rank_rows(self, epoch: int, world: World) -> list[np.ndarray]:
        """The rows of ``world``'s rank in ``epoch`` (:func:`~logitcache.train.packed_order.rank_rows`), kept for
        the latest epoch and rank."""
        if self.pack_tokens is None:
            raise ConfigError("rows are planned with pack_tokens: construct CacheDataset(..., pack_tokens=N)")
        key = (epoch, world.rank, world.world_size)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, rank_rows(self._plan, self.seed, epoch, self.shuffle, world.world_size, world.rank,
                                           drop_uneven=self.drop_uneven))
        return self._packed[1]

    def _reader_world(self) -> World:
        info = get_worker_info()
        return self.world if info is None else self.world.with_worker(info.id, info.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = self._reader_world()
        if reader.num_workers:
            self._read_by_workers.fill_(1)
        self._pass = Pass((reader.worker_id, reader.num_workers), self._resume_offset)
        elements = self.indices() if self.pack_tokens is None else self.rows()
        return self._read(elements[self._resume_offset:], self._pass)

    def _read(self, elements: Any, progress: Pass) -> Iterator[dict[str, Any]]:
        """Items of global sequence indices, or (``pack_tokens``) packed rows of index arrays."""
        done = self._store.last_uses(elements)  # the units each element is the last to read: dropped after it
        for p, element in enumerate(elements):
            out = self._store.item(int(element)) if np.ndim(element) == 0 else pack(
                [self._store.item(int(i)) for i in element])
            for s in done.get(p, ()):
                self._store.release(s)
            progress.yielded += 1
            yield out

    # -- resume -------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed, "shuffle": self.shuffle,
                "world_size": self.world.world_size, "num_sequences": self.num_sequences,
                "store_fingerprint": self.store_fingerprint, "drop_uneven": self.drop_uneven,
                "shuffle_window": self.shuffle_window, "pack_tokens": self.pack_tokens, "pack_window": self.pack_window}

    def state_dict(self, batches_consumed: int | None = None, *, batch_size: int | None = None) -> dict[str, Any]:
        """Resumable state: where this epoch stands (module docstring, "Order and resume"). Without
        ``batches_consumed``: the position this process sees (the elements the latest pass here handed out,
        or the last loaded / epoch-start position; raises once DataLoader workers have read the dataset;
        inside a worker, its worker state). ``batches_consumed=k``: ``k`` loader batches taken since the last
        :meth:`load_state_dict` / :meth:`set_epoch`, so ``consumed = min(skipped + k · batch_size, len(self))``.
        Mid-epoch state needs the dataset's ``batch_size``; ``batch_size`` here, if given, must equal it."""
        if batch_size is not None and self.batch_size is not None and batch_size != self.batch_size:
            raise ConfigError(f"batch_size: found {batch_size}, expected {self.batch_size} (the dataset's "
                              "batch_size, which its workers interleave by)")
        if batches_consumed is not None:
            if batches_consumed < 0:
                raise ConfigError(f"batches_consumed must be >= 0; found {batches_consumed}")
            return self._state(min(self._skip + batches_consumed * (self.batch_size or 0), len(self)),
                               counted=batches_consumed)
        reader = self._reader_world()
        here = (reader.worker_id, reader.num_workers)
        yielded = self._pass.yielded if self._pass is not None and self._pass.reader == here else None
        if reader.num_workers:
            offset = self._resume_offset if yielded is None else yielded
            return {**self._state(self._skip, counted=0), "worker": {"id": reader.worker_id,
                                                                     "num_workers": reader.num_workers,
                                                                     "offset": offset}}
        if int(self._read_by_workers.item()):
            raise ConfigError(READ_BY_WORKERS)
        return self._state(self._skip + (yielded or 0), counted=yielded or 0)

    def _state(self, consumed: int, *, counted: int) -> dict[str, Any]:
        if counted and self.batch_size is None:
            raise ConfigError("mid-epoch state needs the DataLoader's batch size: construct "
                              "CacheDataset(..., batch_size=B) with the B given to the DataLoader")
        return {**self._identity(), "epoch": self.epoch, "batch_size": self.batch_size, "consumed": consumed,
                "worker": None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: validated field by field, then epoch and position adopted.

        A worker state (``state["worker"]``) loads only inside that worker of a DataLoader with the same
        ``num_workers`` (torchdata's ``StatefulDataLoader.load_state_dict`` hands each worker its own)."""
        validate_state(state, self._identity(), self.batch_size, len(self))
        offset = self._worker_offset(state)
        self.batch_size = state["batch_size"] if state["batch_size"] is not None else self.batch_size
        self._begin(int(state["epoch"]), int(state["consumed"]), offset)

    def _worker_offset(self, state: dict[str, Any]) -> int:
        """The resumed offset of ``state``'s worker state, checked against this process; 0 for none."""
        if state.get("worker") is None:
            return 0
        reader = self._reader_world()
        mine = worker_share(len(self), reader, batch_size=state["batch_size"] or 1, skip=state["consumed"]).size
        return worker_offset(state["worker"], reader, mine)


class CacheView(Dataset):
    """Random access to a store's sequences in manifest order (``iter_sequences`` order), for evaluation.

    ``view[i]`` is the same item dict as :class:`CacheDataset` yields; shards open lazily and are
    verified on first use (``verify``). ``collate`` and ``collate_packed`` batch items like
    ``CacheDataset.collate`` and ``CacheDataset.collate_packed``.
    ``on_corrupt`` is as for :class:`CacheDataset` (with ``"skip"``, indices run over the sound shards).
    """

    collate = staticmethod(_collate)
    collate_packed = staticmethod(pack)

    def __init__(self, path: str | os.PathLike, *, verify: bool = True,
                 tokenizer_fingerprint: str | Collection[str] | None = None,
                 cache_shards: int = 4, on_corrupt: str = "raise") -> None:
        self._store = Store(path, verify=verify, tokenizer_fingerprint=tokenizer_fingerprint,
                             cache_shards=cache_shards, on_corrupt=on_corrupt)
        self.path = str(path)

    @property
    def skipped_shards(self) -> int:
        """How many shards ``on_corrupt="skip"`` left out."""
        return len(self._store.skipped)

    def __len__(self) -> int:
        return self._store.num_sequences

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        return self._store.item(int(index))
