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
(:mod:`logitcache.store.waves`), the per-entry contexts of counts and q8 codes and the restore of the q8
codes run in numba-compiled loops, like the coder's; the rest is numpy.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, CorruptShardError
from . import rans
from .bits import bit_length
from .row_decode import row_mask
from .jit import njit_on_first_use
from .totals import count_dtype
from .units import UnitRows
from .waves import Waves

COLUMN = "entropy"
IDX_CAP = 15  # counts: gap-length contexts 0..15
SAMPLE_IDX_BUCKETS = 5  # index 0, 1, 2-3, 4-7, 8+
HEAD_IDX_BUCKETS = 8  # index // 8, up to 7


def _sample_idx_bucket(idx: np.ndarray) -> np.ndarray:
    return np.minimum(bit_length(idx), SAMPLE_IDX_BUCKETS - 1)


def _head_idx_bucket(idx: np.ndarray) -> np.ndarray:
    return np.minimum(idx // 8, HEAD_IDX_BUCKETS - 1)


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
    context of each symbol, or the :class:`Waves` of a gap-length stream.

    ``values`` holds the decoded streams so far (all of them when encoding); a generator so the
    decoder can fill ``values[name]`` before the next contexts are computed. A gap-length stream
    with no entries at all is not coded (no segment, no table)."""
    nb = max(1, int(bit_length(np.array([max(spec.max_samples, 1)]))[0]) + 1)
    if spec.has_samples:
        n = int(layout.positions.sum())
        yield "sample_lengths", np.zeros(n, np.uint8), 1
        lengths = values["sample_lengths"]
        entries = int(lengths.sum())
        if _gapped(spec) and entries:
            waves = Waves.of(lengths, _sample_idx_bucket, SAMPLE_IDX_BUCKETS)
            yield "sample_ids", waves, waves.num_contexts
        gaps = values["sample_ids"] if _gapped(spec) and entries else np.zeros(entries, np.uint8)  # packed: none
        yield "sample_counts", _count_contexts(gaps, lengths, nb), (IDX_CAP + 1) * nb
    if spec.has_head:
        if _gapped(spec) and np.any(spec.k - layout.head_flags):
            waves = Waves.of(spec.k - layout.head_flags, _head_idx_bucket, HEAD_IDX_BUCKETS)
            yield "head_ids", waves, waves.num_contexts
        if spec.encoding.logprobs == "q8":
            n = int(layout.positions.sum())
            yield "head_qmin", np.zeros(n, np.uint8), 1
            yield "head_logprobs", _code_contexts(values["head_qmin"], layout.head_flags, spec.k), 2 * 9


@njit_on_first_use
def _bits(v):
    """The bit length of ``v >= 0`` (0 for 0), as :func:`bits.bit_length`."""
    n = 0
    while v:
        v >>= 1
        n += 1
    return n


@njit_on_first_use
def _count_contexts(gaps, lengths, nb):
    """``sample_counts`` contexts (``uint16``: ``nb <= 13``): ``min(gap, IDX_CAP) * nb`` plus the bit length of
    the entry's position's length."""
    out, at, cap, step = np.empty(gaps.size, np.uint16), 0, np.uint16(IDX_CAP), np.uint16(nb)
    for p in range(lengths.size):
        n = int(lengths[p])
        mine, bits = out[at: at + n], np.uint16(_bits(n))
        for e in range(n):  # uint16 lanes
            mine[e] = min(np.uint16(gaps[at + e]), cap) * step + bits
        at += n
    return out


@njit_on_first_use
def _code_contexts(qmin, flags, k):
    """q8 code contexts (``uint8``, below 18): twice the bit length of the position's smallest code, plus 1 for
    the position's first entry if it is the flagged label."""
    out = np.empty(qmin.size * k, np.uint8)
    for p in range(qmin.size):
        c = 2 * _bits(qmin[p])
        out[p * k: p * k + k] = c
        out[p * k] = c + flags[p]
    return out


@njit_on_first_use
def _restore_codes(diffs, qmin, k):
    """q8 codes in place from ``diffs`` (uint8: code minus its position's smallest, ``k`` per position); returns
    whether a code went past 255 (a corrupt unit)."""
    wrapped = False
    for p in range(qmin.size):
        row, top = diffs[p * k: p * k + k], np.uint8(0)
        for e in range(k):  # uint8 lanes: vectorised
            top = max(top, row[e])
            row[e] += qmin[p]
        wrapped |= int(top) + int(qmin[p]) > 255
    return wrapped


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
        mine = source.segments(values[name]) if isinstance(source, Waves) else [(values[name], source)]
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
    decoder = rans.Decoder(np.frombuffer(blob[end_tables:end_states], "<u4"), np.frombuffer(blob[end_states:], "<u2"),
                           reuse=True)
    layout = _Layout(spec, rows)
    values: dict[str, np.ndarray] = {}
    for name, source, _ in _streams(spec, layout, values):
        if len(values) >= len(tables):
            raise CorruptShardError(f"entropy column has {len(tables)} tables; more streams expected")
        table = tables[len(values)]
        decoded = source.decode(decoder, table) if isinstance(source, Waves) else decoder.decode(source, table)
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
            codes = values["head_logprobs"].astype(np.uint8, copy=False)  # values <= 255 (_limits); restored in place
            if _restore_codes(codes, values["head_qmin"], spec.k):
                raise CorruptShardError("entropy column decodes head_logprobs codes above 255 (a position's smallest "
                                        "code plus a difference); at most 255 is possible")
            split("head_logprobs", codes, layout.positions * spec.k, "u1")
    return out
