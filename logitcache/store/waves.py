"""Gap lengths coded in *waves* (the ``ans`` stage, docs/format.md "Streams"): wave ``w`` holds entry ``w`` of
every position that has one, positions ascending, so that an entry's context can be the same position's
previous gap length, decoded one wave earlier.

:class:`Waves` gives the encoder its segments (wave order, contexts) and decodes a stream's waves in one
compiled kernel (:func:`_decode_waves`): per wave, the positions that have an entry and their contexts,
the rANS steps (:func:`rans.decode_step`), and at the end the move from wave order to stream order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import rans
from .jit import njit_on_first_use

PREV_CAP = 17  # gap lengths: previous gap length 0..17, 18 for a position's first entry


@dataclass(frozen=True)
class Waves:
    """A stream of gap lengths coded in *waves*: wave ``w`` holds entry ``w`` of every position
    that has one (positions ascending), and each wave is a segment of its own (its first symbol in
    lane 0). An entry's context: the same position's previous gap length (up to ``PREV_CAP``;
    ``PREV_CAP + 1`` for a position's first entry), times ``num_buckets``, plus ``buckets[w]``."""

    lengths: np.ndarray  # int64 [positions]: entries per position
    buckets: np.ndarray  # int64 [waves]: the bucket of entry index w
    num_buckets: int

    @classmethod
    def of(cls, lengths: np.ndarray, bucket_of: Callable[[np.ndarray], np.ndarray], num_buckets: int) -> Waves:
        waves = np.arange(int(lengths.max(initial=0)), dtype=np.int64)
        return cls(lengths.astype(np.int64), bucket_of(waves).astype(np.int64), num_buckets)

    @property
    def num_contexts(self) -> int:
        return (PREV_CAP + 2) * self.num_buckets

    def segments(self, values: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Encoder side: ``(symbols, contexts)`` of every wave, from the whole stream ``values``."""
        symbols, contexts, bounds = _wave_order(self.lengths, self.buckets, self.num_buckets, values)
        return [(symbols[lo:hi], contexts[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def decode(self, decoder: rans.Decoder, tables: rans.Tables) -> np.ndarray:
        """The stream's values in stream order (in ``tables.symbol_dtype()``)."""
        decoder.check(self.num_contexts, tables)
        values = np.empty(int(self.lengths.sum()), dtype=tables.symbol_dtype())
        waves = rans.scratch("waves", values.size + WAVE_PAD * self.buckets.size, values.dtype)
        t = tables.lookup
        decoder.advance(_decode_waves(decoder.x, decoder.words, decoder.pos, decoder.size, self.lengths,
                                      self.buckets, self.num_buckets, t.rows, t.slots, t.fc, waves, values))
        return values


@njit_on_first_use
def _next_wave(active, count, lengths, w):
    """Keep, in order, those of the first ``count`` positions in ``active`` with an entry ``w``;
    returns how many were kept."""
    kept = 0
    for j in range(count):
        if lengths[active[j]] > w:
            active[kept] = active[j]
            kept += 1
    return kept


@njit_on_first_use
def _wave_context(values, at, w, bucket, num_buckets):
    """The context of entry ``w`` of a position, which stands at ``values[at]`` (stream order): the
    entry before it (``values[at - 1]``) is the same position's previous gap length."""
    prev = PREV_CAP + 1 if w == 0 else min(values[at - 1], PREV_CAP)
    return prev * num_buckets + bucket


@njit_on_first_use
def _wave_order(lengths, buckets, num_buckets, values):
    """Encoder side: the symbols of ``values`` in wave order, their contexts, where each wave starts."""
    starts, active = np.cumsum(lengths) - lengths, np.arange(lengths.size)
    symbols, contexts = np.empty(values.size, np.int64), np.empty(values.size, np.int64)
    bounds, count = np.zeros(buckets.size + 1, np.int64), lengths.size
    for w in range(buckets.size):
        count = _next_wave(active, count, lengths, w)
        lo = bounds[w]
        for j in range(count):
            at = starts[active[j]] + w
            symbols[lo + j] = values[at]
            contexts[lo + j] = _wave_context(values, at, w, buckets[w], num_buckets)
        bounds[w + 1] = lo + count
    return symbols, contexts, bounds


WAVE_PAD = 64  # bytes between waves in the decoder's wave-order buffer: waves do not share cache sets


@njit_on_first_use
def _decode_waves(x, words, pos, size, lengths, buckets, num_buckets, rows, slots, fc, waves, values):
    """Decode the waves into ``values`` (stream order; each wave's first symbol from lane 0) by way of
    ``waves`` (a buffer of ``values.size + WAVE_PAD * buckets.size``); returns what :func:`rans.decode_step` does.

    The positions of a wave (``count`` of them, their lengths in ``kept``) and each one's context
    (``ctx``, from the entry before it) are kept in order; after each wave one sequential pass derives
    the next wave's contexts, compacting the positions only once some of them end (:func:`_next_wave_of`).
    The wave is decoded into its own region of a wave-order buffer, and one pass at the end puts every entry
    in its place (:func:`_wave_to_stream`: sequential, where writing each wave straight to stream order would
    sweep all of ``values`` per wave)."""
    first = (PREV_CAP + 1) * num_buckets  # a position's first entry: no gap length before it
    kept, ctx = lengths.astype(np.int32), np.full(lengths.size, first + (buckets[0] if buckets.size else 0), np.int32)
    region = np.zeros(buckets.size + 1, np.int64)  # where each wave starts in ``waves``
    count, shortest = _next_wave_of(kept, ctx, lengths.size, 0, 0, waves, -1, 0, 1)  # those with an entry 0
    for w in range(buckets.size):
        lo = region[w]
        for j in range(0, count, x.size):
            pos = rans.decode_step(x, ctx, j, rows, slots, fc, words, pos, size, waves, lo + j, min(x.size, count - j))
            if pos < 0:
                return pos
        region[w + 1] = lo + count + WAVE_PAD
        count, shortest = _next_wave_of(kept, ctx, count, shortest, w + 1, waves, lo,
                                        buckets[min(w + 1, buckets.size - 1)], num_buckets)
    _wave_to_stream(waves, region, lengths, values)
    return pos


@njit_on_first_use
def _next_wave_of(kept, ctx, count, shortest, w, waves, lo, bucket, num_buckets):
    """The positions of wave ``w`` among the ``count`` in ``kept`` (their lengths; ``shortest`` the fewest),
    in order, and the fewest entries among them. Each one's context comes from its gap length just decoded,
    ``waves[lo + j]`` (``lo < 0``: ``ctx`` is kept). Where ``w < shortest`` every position has an entry ``w``
    and the pass is a plain (vectorised) one; else the positions that end are dropped (branch-free)."""
    if lo >= 0:
        for j in range(count):
            ctx[j] = min(waves[lo + j], PREV_CAP) * num_buckets + bucket
    if w < shortest:
        return count, shortest
    n, fewest = 0, np.iinfo(np.int32).max
    for j in range(count):
        length = kept[j]
        kept[n], ctx[n] = length, ctx[j]
        fewest = min(fewest, length if length > w else fewest)
        n += length > w
    return n, fewest


@njit_on_first_use
def _wave_to_stream(waves, region, lengths, values):
    """Entry ``w`` of each position, in position order, is the next unread one of wave ``w``'s region."""
    cursor, out = region[:-1].copy(), 0
    for p in range(lengths.size):
        for w in range(lengths[p]):
            values[out] = waves[cursor[w]]
            cursor[w] += 1
            out += 1
