"""The read side that :class:`~logitcache.train.dataset.CacheDataset` and :class:`~logitcache.train.dataset.CacheView`
share: the manifest, global sequence index → (unit, row), each unit read and checked when first needed (its
checksums with ``verify``) and decoded at once (:mod:`logitcache.store.unit_decode`), a few units kept decoded,
and the item dict of a sequence.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from ..choices import ON_CORRUPT
from ..errors import ConfigError, CorruptShardError, StoreError
from ..store.commit import ShardRecord, read_manifest
from ..store.fs import StoreFS
from ..store.reader import read_unit
from ..store.spec import ShardSpec, spec_from_manifest
from ..store.unit_decode import UnitReader, unit_rows
from .packed_order import record_lengths

__all__ = ["IGNORE_INDEX", "Store"]

IGNORE_INDEX = -100  # labels of untrained positions (those a documents store's train mask leaves out)
log = logging.getLogger("logitcache")


class Store:
    """The read side shared by both datasets: manifest, global index → (shard, row), lazy open and verify."""

    def __init__(self, path: str | os.PathLike, *, verify: bool, tokenizer_fingerprint: str | Collection[str] | None,
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
        given = (tokenizer_fingerprint,) if isinstance(tokenizer_fingerprint, str) else tuple(tokenizer_fingerprint or ())
        if tokenizer_fingerprint is not None and found not in given:
            raise StoreError(f"tokenizer mismatch: the store {self.root} was captured with tokenizer fingerprint "
                             f"{found}; the student's tokenizer has fingerprint {' or '.join(given) or 'none given'}. "
                             "Train with the teacher's tokenizer, or capture a store with this one. (A store captured "
                             "under transformers 4.x by an earlier logitcache may record another form of the same "
                             "tokenizer's fingerprint: pass tokenizer_fingerprints(tokenizer), which accepts it.)")
        self.skipped: list[str] = []  # one line per unit left out (on_corrupt="skip")
        if on_corrupt == "skip":
            self.records, self.skipped = self._sound_records()
        self.sizes = [r.sequences for r in self.records]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        self.num_sequences = int(self.starts[-1])
        self.lengths = record_lengths(self.records, manifest.header.seq_len, self.spec.masked)  # None: unknown
        self.fingerprint = hashlib.sha256("\n".join(r.sha256 for r in self.records).encode()).hexdigest()
        self._open: OrderedDict[int, UnitReader] = OrderedDict()
        if not manifest.complete:  # readers see the committed units only (docs/reliability.md)
            log.warning("store %s is incomplete: %d of its %d sequences are committed (a capture still running, or "
                        "stopped: rerun the same capture command to finish it); reading the committed ones",
                        self.root, self.num_sequences, manifest.header.plan.sequences)

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

    def _shard(self, s: int) -> UnitReader:
        """Unit ``s`` read (checksums first, with ``verify``), its rows decoded (:func:`unit_rows`)."""
        shard = self._open.get(s)
        if shard is not None:
            self._open.move_to_end(s)
            return shard
        record = self.records[s]
        shard = self._open[s] = unit_rows(self.spec, read_unit(self.fs, self.spec, record, check=self.verify),
                                          record.index)
        while len(self._open) > self.cache_shards:
            self._open.popitem(last=False)
        return shard

    def last_uses(self, elements: Any) -> dict[int, list[int]]:
        """``{p: units}``: the units whose last item among ``elements`` (global sequence indices, or arrays of them:
        packed rows) is element ``p``, so that a pass drops each unit from the cache once it is done with it
        (:meth:`release`). Without that, the least recently used unit goes first, which can be one the next window
        still reads: a window spans up to three units, two windows five, and a unit left out read twice."""
        if isinstance(elements, np.ndarray):  # sequence indices
            flat, where = elements.astype(np.int64, copy=False), np.arange(elements.size)
        else:  # packed rows
            sizes = [int(np.size(e)) for e in elements]
            flat = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(e, np.int64).reshape(-1) for e in elements])
            where = np.repeat(np.arange(len(sizes)), sizes)
        units = np.searchsorted(self.starts, flat, side="right") - 1
        last = np.full(len(self.records), -1, np.int64)
        np.maximum.at(last, units, where)
        out: dict[int, list[int]] = {}
        for s in np.flatnonzero(last >= 0).tolist():
            out.setdefault(int(last[s]), []).append(s)
        return out

    def release(self, s: int) -> None:
        """Drop unit ``s`` (a position in ``records``) from the cache, if there; items already made keep their data."""
        self._open.pop(s, None)

    def locate(self, index: int) -> tuple[int, int]:
        """``(position in records, row)`` of global sequence ``index``."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence index {index} out of range [0, {self.num_sequences})")
        s = int(np.searchsorted(self.starts, index, side="right")) - 1
        return s, int(index - self.starts[s])

    def where(self, index: int) -> str:
        s, row = self.locate(index)
        return f"sequence {index} of {self.root} (shard {self.records[s].index}, row {row})"

    def item(self, index: int) -> dict[str, Any]:
        """The item of global sequence ``index`` (manifest shard order, as ``iter_sequences``)."""
        s, row = self.locate(index)
        seq_id, tokens, mask, targets = self._shard(s).row(row)
        if self.lengths is not None and tokens.size != self.lengths[index]:  # what packing planned by
            raise CorruptShardError(f"shard {self.records[s].index} row {row} (seq_id {seq_id}) holds {tokens.size} "
                                    f"tokens; the manifest records {self.lengths[index]}. Run `logitcache verify` "
                                    f"on {self.root}.")
        tokens = torch.from_numpy(tokens.astype(np.int64))
        if mask is None:
            return {"seq_id": seq_id, "input_ids": tokens[:-1], "labels": tokens[1:], "targets": targets}
        loss_mask = torch.from_numpy(mask)
        return {"seq_id": seq_id, "input_ids": tokens[:-1], "labels": torch.where(loss_mask, tokens[1:], IGNORE_INDEX),
                "loss_mask": loss_mask, "targets": targets}
