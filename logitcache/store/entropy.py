"""``encoding.entropy = "ans"``: a unit's symbol streams coded by context-modelled rANS (docs/format.md).

A lossless transform of a whole unit's rows, applied after :func:`encoding.encode_row` and undone
by :func:`unpack_unit` right after the container is read, so everything else sees the same row
columns as with ``entropy = "zstd"``. The streams that zstd's Huffman stage codes poorly move out
of the rows into one blob in the unit's first row (column ``entropy``; empty in the other rows), coded
with tables fitted to the unit (:mod:`logitcache.store.rans`). The streams, in decode
order, and what each symbol's table is chosen by (its *context*, known to the decoder from the
streams before it):

1. ``sample_lengths`` — one table;
2. ``sample_ids`` gap lengths, in *waves* (every position's first entry, then every second entry,
   …) so that the previous gap length of the same position is known — that (up to 17) and the
   entry's index (bucketed);
3. ``sample_counts`` — the entry's gap length (up to 15) and the bit length of the position's length;
4. ``head_ids`` gap lengths, in waves — the previous gap length and the entry's index (bucketed);
5. with ``q8`` logprobs: each position's smallest code (one table), then every code minus it, by
   the bit length of that smallest code and whether the entry is the flagged label.

Id mantissa bits, tokens, flags, tail mass and float logprobs stay in the rows (zstd). The waves
(which positions have an entry ``w``, their contexts, the decode) run in numba-compiled loops, like
the coder's; everything else here is numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, CorruptShardError
from . import rans
from .jit import njit_on_first_use
from .bits import bit_length
from .encoding import row_mask
from .totals import count_dtype
from .units import UnitRows

COLUMN = "entropy"
IDX_CAP = 15  # counts: gap-length contexts 0..15
PREV_CAP = 17  # gap lengths: previous gap length 0..17, 18 for a position's first entry
SAMPLE_IDX_BUCKETS = 5  # index 0, 1, 2-3, 4-7, 8+
HEAD_IDX_BUCKETS = 8  # index // 8, up to 7


def _sample_idx_bucket(idx: np.ndarray) -> np.ndarray:
    return np.minimum(bit_length(idx), SAMPLE_IDX_BUCKETS - 1)


def _head_idx_bucket(idx: np.ndarray) -> np.ndarray:
    return np.minimum(idx // 8, HEAD_IDX_BUCKETS - 1)


@dataclass(frozen=True)
class _Waves:
    """A stream of gap lengths coded in *waves*: wave ``w`` holds entry ``w`` of every position
    that has one (positions ascending), and each wave is a segment of its own (its first symbol in
    lane 0). An entry's context: the same position's previous gap length (up to ``PREV_CAP``;
    ``PREV_CAP + 1`` for a position's first entry), times ``num_buckets``, plus ``buckets[w]``."""

    lengths: np.ndarray  # int64 [positions]: entries per position
    buckets: np.ndarray  # int64 [waves]: the bucket of entry index w
    num_buckets: int

    @classmethod
    def of(cls, lengths: np.ndarray, bucket_of: Callable[[np.ndarray], np.ndarray], num_buckets: int) -> _Waves:
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
        values = np.zeros(int(self.lengths.sum()), dtype=tables.symbol_dtype())
        t = tables.lookup
        decoder.advance(_decode_waves(decoder.x, decoder.words, decoder.pos, decoder.size, self.lengths,
                                      self.buckets, self.num_buckets, t.rows, t.slots, t.fc, values))
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
def _decode_waves(x, words, pos, size, lengths, buckets, num_buckets, rows, slots, fc, values):
    """Decode the waves into ``values`` (stream order; each wave's first symbol from lane 0); returns
    what :func:`rans.decode_stream` does.

    Per wave: the positions that have an entry ``w`` (kept in order only once some position ends) and
    each one's context (``ctx``, from the entry before it); the wave is decoded into its own region of
    a wave-order buffer, and one pass at the end puts every entry in its place (:func:`_wave_to_stream`:
    sequential, where writing each wave straight to stream order would sweep all of ``values`` per wave)."""
    ctx = np.full(lengths.size, (PREV_CAP + 1) * num_buckets + (buckets[0] if buckets.size else 0), np.int32)
    active = np.arange(lengths.size)
    region = np.zeros(buckets.size + 1, np.int64)  # where each wave starts in ``waves``
    waves = np.empty(values.size + WAVE_PAD * buckets.size, values.dtype)
    count, lanes, shortest = lengths.size, x.size, lengths.min() if lengths.size else 0
    for w in range(buckets.size):
        if w >= shortest:
            count, shortest = _keep_longer(active, ctx, count, lengths, w)
        lo = region[w]
        for j in range(0, count, lanes):
            pos = rans.decode_step(x, ctx, j, rows, slots, fc, words, pos, size, waves, lo + j, min(lanes, count - j))
            if pos < 0:
                return pos
        bucket = buckets[min(w + 1, buckets.size - 1)]
        for j in range(count):
            ctx[j] = min(waves[lo + j], PREV_CAP) * num_buckets + bucket
        region[w + 1] = lo + count + WAVE_PAD
    _wave_to_stream(waves, region, lengths, values)
    return pos


@njit_on_first_use
def _keep_longer(active, ctx, count, lengths, w):
    """Keep, in order, those of the first ``count`` positions (with their ``ctx``) that have an entry
    ``w``; returns how many and the fewest entries among them."""
    kept, shortest = 0, np.iinfo(np.int64).max
    for j in range(count):
        if lengths[active[j]] > w:
            active[kept], ctx[kept] = active[j], ctx[j]
            shortest = min(shortest, lengths[active[j]])
            kept += 1
    return kept, shortest


@njit_on_first_use
def _wave_to_stream(waves, region, lengths, values):
    """Entry ``w`` of each position, in position order, is the next unread one of wave ``w``'s region."""
    cursor, out = region[:-1].copy(), 0
    for p in range(lengths.size):
        for w in range(lengths[p]):
            values[out] = waves[cursor[w]]
            cursor[w] += 1
            out += 1


def _gapped(spec) -> bool:
    """Rank-delta ids leave gap lengths in the ``*_ids`` columns; packed ids leave them empty."""
    return spec.encoding.ids == "rank-delta"


def _count_dtype(spec) -> str:
    return count_dtype(spec.num_samples)


class _Layout:
    """What the decoder knows of a unit before decoding: positions per row (a masked row's trained
    positions) and label flags."""

    def __init__(self, spec, rows: list[dict[str, np.ndarray]]) -> None:
        if any(r["tokens"].size < 4 for r in rows):
            raise CorruptShardError("a row of an entropy-coded unit has no tokens")
        masks = [row_mask(r) for r in rows]  # a masked row's positions are those its train mask marks
        self.positions = np.array([r["tokens"].size // 4 - 1 if m is None else int(m.sum())
                                   for r, m in zip(rows, masks)], dtype=np.int64)
        self.head_flags = None
        if spec.has_head:
            for i, (r, t) in enumerate(zip(rows, self.positions)):
                if r["head_label"].size != -(-t // 8):
                    raise CorruptShardError(f"row {i}: label flags hold {r['head_label'].size} bytes; its {t} "
                                            f"positions take {-(-t // 8)}")
            flags = [np.unpackbits(r["head_label"])[:t] for r, t in zip(rows, self.positions)]
            self.head_flags = np.concatenate(flags).astype(np.int64) if rows else np.zeros(0, np.int64)


def _streams(spec, layout: _Layout, values: dict[str, np.ndarray]):
    """Yield ``(stream name, source, number of contexts)`` in decode order; ``source`` is the
    context of each symbol, or the :class:`_Waves` of a gap-length stream.

    ``values`` holds the decoded streams so far (all of them when encoding); a generator so the
    decoder can fill ``values[name]`` before the next contexts are computed. A gap-length stream
    with no entries at all is not coded (no segment, no table)."""
    nb = max(1, int(bit_length(np.array([max(spec.max_samples, 1)]))[0]) + 1)
    if spec.has_samples:
        n = int(layout.positions.sum())
        yield "sample_lengths", np.zeros(n, np.int64), 1
        lengths = values["sample_lengths"]
        gaps = np.zeros(int(lengths.sum()), np.int64)  # packed ids: no gap lengths to code or to condition on
        if _gapped(spec) and gaps.size:
            waves = _Waves.of(lengths, _sample_idx_bucket, SAMPLE_IDX_BUCKETS)
            yield "sample_ids", waves, waves.num_contexts
            gaps = values["sample_ids"]
        yield "sample_counts", np.minimum(gaps, IDX_CAP).astype(np.uint16) * np.uint16(nb) + \
            np.repeat(bit_length(lengths).astype(np.uint16), lengths), (IDX_CAP + 1) * nb  # < 2**16: nb <= 13
    if spec.has_head:
        if _gapped(spec) and np.any(spec.k - layout.head_flags):
            waves = _Waves.of(spec.k - layout.head_flags, _head_idx_bucket, HEAD_IDX_BUCKETS)
            yield "head_ids", waves, waves.num_contexts
        if spec.encoding.logprobs == "q8":
            n = int(layout.positions.sum())
            yield "head_qmin", np.zeros(n, np.int64), 1
            ctx = np.repeat((bit_length(values["head_qmin"]) * 2).astype(np.uint8), spec.k)  # contexts below 18
            ctx[::spec.k] += layout.head_flags.astype(np.uint8)
            yield "head_logprobs", ctx, 2 * 9


def _row_values(spec, rows: list[dict], layout: _Layout) -> dict[str, np.ndarray]:
    """The coded streams of a unit's rows, concatenated in row order (encoder side)."""
    cd = _count_dtype(spec)

    def cat(name: str, dtype: str) -> np.ndarray:
        return np.concatenate([np.frombuffer(r[name], dtype) for r in rows]).astype(np.int64) if rows else \
            np.zeros(0, np.int64)

    out = {}
    if spec.has_samples:
        out["sample_lengths"] = cat("sample_lengths", cd)
        out["sample_ids"] = cat("sample_ids", "u1")
        out["sample_counts"] = cat("sample_counts", cd)
    if spec.has_head:
        out["head_ids"] = cat("head_ids", "u1")
        if spec.encoding.logprobs == "q8":
            codes = cat("head_logprobs", "u1").reshape(-1, spec.k)
            out["head_qmin"] = codes.min(axis=1) if codes.size else np.zeros(0, np.int64)
            out["head_logprobs"] = (codes - out["head_qmin"][:, None]).ravel()
    return out


def coded_columns(spec) -> list[str]:
    cols = []
    if spec.has_samples:
        cols += ["sample_lengths", "sample_counts"] + (["sample_ids"] if _gapped(spec) else [])
    if spec.has_head:
        cols += (["head_ids"] if _gapped(spec) else []) + (["head_logprobs"] if spec.encoding.logprobs == "q8" else [])
    return cols


def lanes_for(symbols: int) -> int:
    """Interleaved lanes: about 4096 symbols each (the flush costs 4 bytes per lane), 1 to 1024."""
    return int(min(1024, max(1, 1 << max(0, math.ceil(math.log2(max(1, symbols) / 4096))))))


MAX_SAMPLES = rans.M - 1  # lengths take up to N + 1 values in one table


def check_spec(spec) -> None:
    if spec.has_samples and spec.max_samples > MAX_SAMPLES:
        raise ConfigError(f"the ans entropy stage codes sample counts of N <= {MAX_SAMPLES}; found N = "
                          f"{spec.max_samples} (a position's most draws). Use --entropy zstd for more draws.")


def _limits(spec) -> dict[str, int]:
    """The largest value each stream may hold: a decoded value above it means a corrupt unit."""
    return {"sample_lengths": spec.max_samples, "sample_ids": 32, "sample_counts": max(spec.max_samples - 1, 0),
            "head_ids": 32, "head_qmin": 255, "head_logprobs": 255}


def fit_unit(spec, rows: list[dict[str, bytes]]) -> tuple[list[tuple[str, np.ndarray, np.ndarray]],
                                                         dict[str, rans.Tables]]:
    """A unit's coded segments ``(stream name, symbols, contexts)`` in decode order, and each
    stream's table fitted to all its segments (waves share their stream's table)."""
    check_spec(spec)
    layout = _Layout(spec, [{k: np.frombuffer(v, np.uint8) for k, v in r.items()} for r in rows])
    values = _row_values(spec, rows, layout)
    segments: list[tuple[str, np.ndarray, np.ndarray]] = []
    tables: dict[str, rans.Tables] = {}
    for name, source, num_ctx in _streams(spec, layout, values):
        mine = source.segments(values[name]) if isinstance(source, _Waves) else [(values[name], source)]
        sym = np.concatenate([m[0] for m in mine])
        tables[name] = rans.Tables.fit(sym, np.concatenate([m[1] for m in mine]), num_ctx,
                                       int(sym.max()) + 1 if sym.size else 1)
        segments += [(name, *m) for m in mine]
    return segments, tables


def pack_unit(spec, rows: list[dict[str, bytes]]) -> list[dict[str, bytes]]:
    """Rows of :func:`encode_row` columns → the same rows without the coded columns, and the
    unit's blob in row 0's ``entropy`` column."""
    segments, tables = fit_unit(spec, rows)
    streams = [(sym, ctx, tables[name]) for name, sym, ctx in segments]
    lanes = lanes_for(sum(s[0].size for s in streams))
    states, words = rans.encode(streams, lanes)
    packed = rans.pack_tables(list(tables.values()))
    blob = (np.array([lanes, len(packed)], "<u4").tobytes() + packed + states.astype("<u4").tobytes()
            + words.astype("<u2").tobytes())
    coded = set(coded_columns(spec))
    return [{**{k: v for k, v in r.items() if k not in coded}, COLUMN: blob if i == 0 else b""}
            for i, r in enumerate(rows)]


def unpack_unit(spec, unit: UnitRows) -> UnitRows:
    """Undo :func:`pack_unit`: the unit's rows with their coded columns restored."""
    rows = [unit.row(r) for r in range(len(unit))]
    if not rows:
        return unit
    blob = rows[0][COLUMN]  # uint8, read in place
    if any(r[COLUMN].size for r in rows[1:]):
        raise CorruptShardError("an entropy-coded unit has entropy bytes outside its first row")
    if len(blob) < 8:
        raise CorruptShardError(f"entropy column holds {len(blob)} bytes; at least 8 expected")
    lanes, tlen = (int(v) for v in np.frombuffer(blob[:8], "<u4"))
    end_tables, end_states = 8 + tlen, 8 + tlen + 4 * lanes
    if lanes < 1 or end_states > len(blob) or (len(blob) - end_states) % 2:
        raise CorruptShardError(f"entropy column of {len(blob)} bytes does not fit {lanes} lanes and "
                                f"{tlen} bytes of tables")
    tables = rans.unpack_tables(blob[8:end_tables].tobytes())
    decoder = rans.Decoder(np.frombuffer(blob[end_tables:end_states], "<u4"), np.frombuffer(blob[end_states:], "<u2"))
    layout = _Layout(spec, rows)
    values: dict[str, np.ndarray] = {}
    for name, source, _ in _streams(spec, layout, values):
        if len(values) >= len(tables):
            raise CorruptShardError(f"entropy column has {len(tables)} tables; more streams expected")
        table = tables[len(values)]
        decoded = source.decode(decoder, table) if isinstance(source, _Waves) else decoder.decode(source, table)
        if decoded.size and decoded.max() > _limits(spec)[name]:
            raise CorruptShardError(f"entropy column decodes a {name} value of {int(decoded.max())}; "
                                    f"at most {_limits(spec)[name]} is possible")
        values[name] = decoded
    if len(values) != len(tables):
        raise CorruptShardError(f"entropy column has {len(tables)} tables for {len(values)} streams")
    decoder.finish()
    restored = _split_rows(spec, layout, values)
    kept = {name: col for name, col in unit.columns.items() if name != COLUMN}  # no copy of the rest
    return UnitRows(unit.seq_ids, {**kept, **restored}, keepalive=unit.keepalive)


def _split_rows(spec, layout: _Layout, values: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decoded streams → unit columns (bytes, row offsets), as :func:`encoding.encode_row` wrote each row."""
    cd = _count_dtype(spec)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def split(name: str, data: np.ndarray, per_row: np.ndarray, dtype: str) -> None:
        if data.size != int(per_row.sum()):
            raise CorruptShardError(f"entropy column decodes {data.size} {name} values; {int(per_row.sum())} expected")
        if data.size and not np.can_cast(data.dtype, dtype) and (data.min() < 0 or
                                                                 data.max() > np.iinfo(np.dtype(dtype)).max):
            raise CorruptShardError(f"entropy column decodes {name} values outside {dtype}")
        offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64) * np.dtype(dtype).itemsize
        out[name] = (data.astype(dtype, copy=False).view(np.uint8), offsets)

    rows_of_pos = np.repeat(np.arange(layout.positions.size), layout.positions)
    if spec.has_samples:
        lengths = values["sample_lengths"]
        split("sample_lengths", lengths, layout.positions, cd)
        entries = np.bincount(rows_of_pos, weights=lengths, minlength=layout.positions.size).astype(np.int64)
        if _gapped(spec):
            split("sample_ids", values.get("sample_ids", np.zeros(0, np.int64)), entries, "u1")
        split("sample_counts", values["sample_counts"], entries, cd)
    if spec.has_head:
        if _gapped(spec):
            rest = np.bincount(rows_of_pos, weights=spec.k - layout.head_flags,
                               minlength=layout.positions.size).astype(np.int64)
            split("head_ids", values.get("head_ids", np.zeros(0, np.int64)), rest, "u1")
        if spec.encoding.logprobs == "q8":
            diffs = values["head_logprobs"].astype(np.uint8, copy=False).reshape(-1, spec.k)  # values <= 255 (_limits)
            codes = diffs + values["head_qmin"].astype(np.uint8, copy=False)[:, None]  # uint8: a sum past 255 wraps
            if np.any(codes < diffs):
                raise CorruptShardError("entropy column decodes head_logprobs codes above 255 (a position's smallest "
                                        "code plus a difference); at most 255 is possible")
            split("head_logprobs", codes.ravel(), layout.positions * spec.k, "u1")
    return out
