"""Stream a store to a student trainer: :class:`CacheDataset` (training) and :class:`CacheView` (evaluation).

Items are ``{"seq_id": int, "input_ids": int64[T], "labels": int64[T], "targets": SparseTargets}``
(``input_ids = tokens[:-1]``, ``labels = tokens[1:]``). A ``documents`` store (chat conversations,
documents of their own length) adds ``"loss_mask": bool[T]``, the row's train mask: ``labels`` is
``-100`` where it is 0, and ``targets`` covers only the ``loss_mask.sum()`` trained positions, in order.
Batch items with ``ds.collate`` (:func:`logitcache.train.collate.collate`: padded ``[B, T]``) or
``ds.collate_packed`` (:func:`logitcache.train.packing.pack`: the loader's ``B`` sequences in one
padding-free row ``[1, total]``; feed the student :func:`logitcache.train.packing.model_inputs`).
Either way a batch holds ``batch_size`` sequences, so the resume state below is the same.

Reading is lazy: a shard is memory-mapped only when a reader first needs one of its rows, its
checksum is verified then (``verify=True``; a mismatch raises :class:`CorruptShardError` naming the
shard, before any of its rows is yielded), and a few recently used shards are kept open.

Order and resume. The epoch order is :func:`logitcache.train.partition.epoch_order` of ``(seed, epoch)``;
each rank reads a contiguous slice of it (:func:`logitcache.train.partition.partition`). When the dataset
knows the DataLoader's ``batch_size``, its workers hand out whole batches in the loader's own
round-robin (batch ``j`` from worker ``j mod num_workers``), so the loader yields the rank's slice
*exactly in order*, for any ``num_workers``. A checkpoint therefore needs one number, the
sequences consumed so far. :meth:`CacheDataset.state_dict` gives it when this process can see it
and refuses when it cannot, never an epoch-start state for a mid-epoch call:

* main process, the dataset iterated here (``DataLoader(num_workers=0)``): the items handed out by
  the latest pass so far, counted as they are yielded. Something that reads ahead of the training
  step in this process (Accelerate's ``DataLoaderShard`` reads one batch ahead) is counted too: then
  pass ``batches_consumed``.
* main process, not iterated since the last :meth:`~CacheDataset.load_state_dict` /
  :meth:`~CacheDataset.set_epoch`: that position (the epoch start, or the state loaded).
* main process, once DataLoader workers have read the dataset (``num_workers > 0``): the main
  process does not see what they yielded, nor what the loader has prefetched, so ``state_dict()``
  raises :class:`~logitcache.errors.ConfigError`. The workers announce themselves in a flag shared
  across processes, set when a worker's iterator is created (before it can yield a batch).
  Pass ``batches_consumed=k`` (batches taken from the loader), or let torchdata's
  ``StatefulDataLoader`` checkpoint the loader.
* inside a DataLoader worker (``get_worker_info()`` set; where ``StatefulDataLoader`` calls it):
  that worker's own position, a *worker state* (``state["worker"]``) that only the same worker of a
  loader with the same ``num_workers`` loads back.

``state_dict(batches_consumed=k)`` states the position itself::

    ds = CacheDataset(path, shuffle=True, seed=0, batch_size=8)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=ds.collate)
    for step, batch in enumerate(loader):
        train_step(batch)
        state = ds.state_dict(batches_consumed=step + 1)    # at a batch boundary
    # later, in a fresh process
    ds = CacheDataset(path, shuffle=True, seed=0, batch_size=8); ds.load_state_dict(state)

Contract: resume is exact when the state is taken at a batch boundary and the same ``batch_size``
is used (``num_workers`` may change, except for a worker state). The position applies to the epoch
in the state until :meth:`CacheDataset.set_epoch` moves to another epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .collate import collate as _collate
from ..choices import ON_CORRUPT
from ..errors import ConfigError, StoreError
from .packing import pack
from .partition import default_window, epoch_order, partition, rank_count
from .resume_state import READ_BY_WORKERS, Pass, validate_state, worker_offset
from ..store.encoding import decode_row, row_mask
from ..store.fs import StoreFS
from ..store.commit import ShardRecord, read_manifest
from ..store.reader import read_unit
from ..store.spec import ShardSpec, spec_from_manifest
from ..store.units import UnitRows
from .world import World, detect_world

__all__ = ["CacheDataset", "CacheView", "STATE_VERSION"]

STATE_VERSION = 1
IGNORE_INDEX = -100  # labels of untrained positions (those a documents store's train mask leaves out)
log = logging.getLogger("logitcache")


class _Store:
    """The read side shared by both datasets: manifest, global index → (shard, row), lazy open and verify."""

    def __init__(self, path: str | os.PathLike, *, verify: bool, tokenizer_fingerprint: str | None,
                 cache_shards: int = 4, on_corrupt: str = "raise") -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}; found {on_corrupt!r}")
        self.root = str(path)
        self.fs = StoreFS(path)
        manifest = read_manifest(self.fs)
        self.spec: ShardSpec = spec_from_manifest(manifest.header)
        self.records: list[ShardRecord] = list(manifest.shards)
        self.verify = verify
        self.cache_shards = max(1, cache_shards)
        found = manifest.header.tokenizer.fingerprint
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != found:
            raise StoreError(f"tokenizer mismatch: the store {self.root} was captured with tokenizer fingerprint "
                             f"{found}; the student's tokenizer has fingerprint {tokenizer_fingerprint}. "
                             "Train with the teacher's tokenizer, or capture a store with this one.")
        self.skipped: list[str] = []  # one line per unit left out (on_corrupt="skip")
        if on_corrupt == "skip":
            self.records, self.skipped = self._sound_records()
        self.sizes = [r.sequences for r in self.records]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        self.num_sequences = int(self.starts[-1])
        self.fingerprint = hashlib.sha256("\n".join(r.sha256 for r in self.records).encode()).hexdigest()
        self._open: OrderedDict[int, UnitRows] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # mapped buffers stay in the process that opened them
        return state

    def _sound_records(self) -> tuple[list[ShardRecord], list[str]]:
        """Every unit checked now (checksums, rows): the sound ones, and one line per bad one."""
        sound, problems = [], []
        for record in self.records:
            try:
                read_unit(self.fs, self.spec, record, check=True)
                sound.append(record)
            except StoreError as exc:
                problems.append(str(exc))
                log.warning("skipping corrupt unit (on_corrupt='skip'): %s", exc)
        if problems:
            log.warning("skipped %d of %d units of %s", len(problems), len(self.records), self.root)
        return sound, problems

    def _shard(self, s: int) -> UnitRows:
        shard = self._open.get(s)
        if shard is not None:
            self._open.move_to_end(s)
            return shard
        shard = self._open[s] = read_unit(self.fs, self.spec, self.records[s], check=self.verify)
        while len(self._open) > self.cache_shards:
            self._open.popitem(last=False)
        return shard

    def item(self, index: int) -> dict[str, Any]:
        """The item of global sequence ``index`` (manifest shard order, as ``iter_sequences``)."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence index {index} out of range [0, {self.num_sequences})")
        s = int(np.searchsorted(self.starts, index, side="right")) - 1
        row = int(index - self.starts[s])
        shard = self._shard(s)
        columns = shard.row(row)
        tokens, targets = decode_row(self.spec.encoding, self.spec.method, self.spec.num_samples, self.spec.k,
                                     columns)
        tokens = torch.from_numpy(tokens.astype(np.int64))
        seq_id, mask = int(shard.seq_ids[row]), row_mask(columns)
        if mask is None:
            return {"seq_id": seq_id, "input_ids": tokens[:-1], "labels": tokens[1:], "targets": targets}
        loss_mask = torch.from_numpy(mask)
        return {"seq_id": seq_id, "input_ids": tokens[:-1], "labels": torch.where(loss_mask, tokens[1:], IGNORE_INDEX),
                "loss_mask": loss_mask, "targets": targets}


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
        tokenizer_fingerprint: the student tokenizer's fingerprint; refused unless equal to the store's.
        batch_size: the DataLoader's batch size; needed for mid-epoch state with ``num_workers > 1``.
        shuffle_window: window of the in-window shuffle (default twice the largest shard).
        cache_shards: shards kept open per reader.
        on_corrupt: ``"raise"`` (default): a bad shard raises :class:`CorruptShardError` naming it, before
            any of its rows is yielded. ``"skip"``: every shard is checked when the dataset is built
            (checksums, row count) and bad ones are left out of the epoch, logged as warnings and
            listed in :attr:`corrupt_shards`. Either way no row of a bad shard is ever yielded.
    """

    collate = staticmethod(_collate)
    collate_packed = staticmethod(pack)

    def __init__(self, path: str | os.PathLike, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                 world: World | None = None, drop_uneven: bool = False, verify: bool = True,
                 tokenizer_fingerprint: str | None = None, batch_size: int | None = None,
                 shuffle_window: int | None = None, cache_shards: int = 4, on_corrupt: str = "raise") -> None:
        super().__init__()
        self._store = _Store(path, verify=verify, tokenizer_fingerprint=tokenizer_fingerprint,
                             cache_shards=cache_shards, on_corrupt=on_corrupt)
        self.path = str(path)
        self.shuffle, self.seed, self.drop_uneven = bool(shuffle), int(seed), bool(drop_uneven)
        self.world = (world or detect_world()).with_worker(0, 0)
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 or None; found {batch_size}")
        self.batch_size = batch_size
        self.shuffle_window = int(shuffle_window or default_window(self._store.sizes))
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

    def __len__(self) -> int:
        """Sequences this rank yields per epoch (all its workers together)."""
        return rank_count(self.num_sequences, self.world.world_size, drop_uneven=self.drop_uneven)

    def order(self) -> np.ndarray:
        """``int64[]`` global order of sequence indices of the current epoch."""
        return epoch_order(self.num_sequences, self.seed, self.epoch, self.shuffle,
                           shard_sizes=self._store.sizes, window=self.shuffle_window)

    def indices(self, world: World | None = None) -> np.ndarray:
        """``int64[]`` global sequence indices ``world`` reads this epoch (default: this process)."""
        world = world or self._reader_world()
        return partition(self.order(), world, drop_uneven=self.drop_uneven, batch_size=self.batch_size or 1,
                         skip=self._skip)

    def _reader_world(self) -> World:
        info = get_worker_info()
        return self.world if info is None else self.world.with_worker(info.id, info.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = self._reader_world()
        if reader.num_workers:
            self._read_by_workers.fill_(1)
        self._pass = Pass((reader.worker_id, reader.num_workers), self._resume_offset)
        return self._read(self.indices()[self._resume_offset:], self._pass)

    def _read(self, indices: np.ndarray, progress: Pass) -> Iterator[dict[str, Any]]:
        for index in indices:
            item = self._store.item(int(index))
            progress.yielded += 1
            yield item

    # -- resume -------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.seed, "shuffle": self.shuffle,
                "world_size": self.world.world_size, "num_sequences": self.num_sequences,
                "store_fingerprint": self.store_fingerprint, "drop_uneven": self.drop_uneven,
                "shuffle_window": self.shuffle_window}

    def state_dict(self, batches_consumed: int | None = None, *, batch_size: int | None = None) -> dict[str, Any]:
        """Resumable state: where this epoch stands (see the module docstring, "Order and resume").

        Without ``batches_consumed``: the position this process sees. In the main process, the
        sequences the latest pass handed out (the dataset iterated here, ``num_workers=0``), or the
        position of the last :meth:`load_state_dict` / :meth:`set_epoch` when nothing was read since;
        once DataLoader workers have read the dataset it raises :class:`ConfigError` (this process
        cannot see their progress). Inside a DataLoader worker (where torchdata's
        ``StatefulDataLoader`` calls it): that worker's own position, a state only that worker loads back.

        ``batches_consumed=k``: ``k`` batches taken from the loader since the last
        :meth:`load_state_dict` or :meth:`set_epoch` (``enumerate(loader)`` index + 1); the state holds
        ``consumed = min(already skipped + k · batch_size, len(self))``, whatever was read.

        Mid-epoch main-process state needs the dataset's ``batch_size`` (the one its workers interleave
        by); ``batch_size`` here, if given, must equal it.
        """
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
        mine = partition(np.arange(self.num_sequences), reader, drop_uneven=self.drop_uneven,
                         batch_size=state["batch_size"] or 1, skip=state["consumed"]).size
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

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, tokenizer_fingerprint: str | None = None,
                 cache_shards: int = 4, on_corrupt: str = "raise") -> None:
        self._store = _Store(path, verify=verify, tokenizer_fingerprint=tokenizer_fingerprint,
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
