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

Id mantissa bits, tokens, flags, tail mass and float logprobs stay in the rows (zstd).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, CorruptShardError
from . import rans
from .bits import bit_length
from .units import UnitRows, from_blobs

COLUMN = "entropy"
IDX_CAP = 15  # counts: gap-length contexts 0..15
PREV_CAP = 17  # gap lengths: previous gap length 0..17, 18 for a position's first entry
SAMPLE_IDX_BUCKETS = 5  # index 0, 1, 2-3, 4-7, 8+
HEAD_IDX_BUCKETS = 8  # index // 8, up to 7


def _sample_idx_bucket(idx: np.ndarray) -> np.ndarray:
    return np.minimum(bit_length(idx), SAMPLE_IDX_BUCKETS - 1)


def _head_idx_bucket(idx: np.ndarray) -> np.ndarray:
    return np.minimum(idx // 8, HEAD_IDX_BUCKETS - 1)


def _waves(name: str, idx: np.ndarray, buckets: np.ndarray, num_buckets: int, values: dict[str, np.ndarray]):
    """Gap lengths in waves: wave ``w`` holds every position's entry ``w`` (positions ascending).
    Yields ``(name, entries, contexts, number of contexts)`` per wave; the context is the same
    position's previous gap length (read from ``values[name]``, decoded by then) and the bucket."""
    key = idx.astype(np.uint16) if idx.size and idx.max() < 1 << 16 else idx  # stable sort of uint16: radix
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(idx[order], np.arange(int(idx.max(initial=-1)) + 2))
    for w in range(bounds.size - 1):
        entries = order[bounds[w]:bounds[w + 1]]
        prev = np.full(entries.size, PREV_CAP + 1) if w == 0 else np.minimum(values[name][entries - 1], PREV_CAP)
        yield name, entries, prev * num_buckets + buckets[entries], (PREV_CAP + 2) * num_buckets


def _within(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each entry, index of each entry within its position)."""
    pos = np.repeat(np.arange(lengths.size), lengths)
    idx = np.arange(pos.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return pos, idx


def _gapped(spec) -> bool:
    """Rank-delta ids leave gap lengths in the ``*_ids`` columns; packed ids leave them empty."""
    return spec.encoding.ids == "rank-delta"


def _count_dtype(spec) -> str:
    return "u1" if spec.num_samples <= 255 else "<u2"


class _Layout:
    """What the decoder knows of a unit before decoding: positions per row and label flags."""

    def __init__(self, spec, rows: list[dict[str, np.ndarray]]) -> None:
        self.positions = np.array([r["tokens"].size // 4 - 1 for r in rows], dtype=np.int64)
        if np.any(self.positions < 0):
            raise CorruptShardError("a row of an entropy-coded unit has no tokens")
        self.head_flags = None
        if spec.has_head:
            flags = [np.unpackbits(r["head_label"])[:t] for r, t in zip(rows, self.positions)]
            if any(f.size != t for f, t in zip(flags, self.positions)):
                raise CorruptShardError("a row's label flags are shorter than its positions")
            self.head_flags = np.concatenate(flags).astype(np.int64) if rows else np.zeros(0, np.int64)


def _streams(spec, layout: _Layout, values: dict[str, np.ndarray]):
    """Yield ``(stream name, entries, context of each symbol, number of contexts)`` in decode order;
    ``entries`` is ``None`` for a whole stream, or the indices of one wave's symbols in it.

    ``values`` holds the decoded streams so far (all of them when encoding); a generator so the
    decoder can fill ``values[name]`` before the next contexts are computed."""
    nb = max(1, int(bit_length(np.array([max(spec.num_samples, 1)]))[0]) + 1)
    if spec.has_samples:
        n = int(layout.positions.sum())
        yield "sample_lengths", None, np.zeros(n, np.int64), 1
        lengths = values["sample_lengths"]
        lb = bit_length(lengths)
        pos, idx = _within(lengths)
        if _gapped(spec):
            yield from _waves("sample_ids", idx, _sample_idx_bucket(idx), SAMPLE_IDX_BUCKETS, values)
            gaps = values.get("sample_ids", np.zeros(0, np.int64))  # absent: no entry had a gap
        else:  # packed ids: no gap lengths to code or to condition on
            gaps = np.zeros(pos.size, np.int64)
        yield "sample_counts", None, np.minimum(gaps, IDX_CAP) * nb + lb[pos], (IDX_CAP + 1) * nb
    if spec.has_head:
        if _gapped(spec):
            _, idx = _within(spec.k - layout.head_flags)
            yield from _waves("head_ids", idx, _head_idx_bucket(idx), HEAD_IDX_BUCKETS, values)
        if spec.encoding.logprobs == "q8":
            n = int(layout.positions.sum())
            yield "head_qmin", None, np.zeros(n, np.int64), 1
            qmin = values["head_qmin"]
            first = np.zeros((n, spec.k), dtype=np.int64)
            first[:, 0] = layout.head_flags
            ctx = np.repeat(bit_length(qmin) * 2, spec.k) + first.ravel()
            yield "head_logprobs", None, ctx, 2 * 9


def _stream_sizes(spec, layout: _Layout, values: dict[str, np.ndarray]) -> dict[str, int]:
    """How many symbols each stream has, from the streams decoded before it."""
    n = int(layout.positions.sum())
    sizes = {"sample_lengths": n, "head_qmin": n, "head_logprobs": n * spec.k}
    if "sample_lengths" in values:
        sizes["sample_ids"] = sizes["sample_counts"] = int(values["sample_lengths"].sum())
    if spec.has_head:
        sizes["head_ids"] = int((spec.k - layout.head_flags).sum())
    return sizes


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
    if spec.has_samples and spec.num_samples > MAX_SAMPLES:
        raise ConfigError(f"the ans entropy stage codes sample counts of N <= {MAX_SAMPLES}; found N = "
                          f"{spec.num_samples}. Use --entropy zstd for more draws.")


def _limits(spec) -> dict[str, int]:
    """The largest value each stream may hold: a decoded value above it means a corrupt unit."""
    return {"sample_lengths": spec.num_samples, "sample_ids": 32, "sample_counts": max(spec.num_samples - 1, 0),
            "head_ids": 32, "head_qmin": 255, "head_logprobs": 255}


def fit_unit(spec, rows: list[dict[str, bytes]]) -> tuple[list[tuple[str, np.ndarray, np.ndarray]],
                                                         dict[str, rans.Tables]]:
    """A unit's coded segments ``(stream name, symbols, contexts)`` in decode order, and each
    stream's table fitted to all its segments (waves share their stream's table)."""
    check_spec(spec)
    layout = _Layout(spec, [{k: np.frombuffer(v, np.uint8) for k, v in r.items()} for r in rows])
    values = _row_values(spec, rows, layout)
    parts = [(name, values[name] if entries is None else values[name][entries], ctx, num_ctx)
             for name, entries, ctx, num_ctx in _streams(spec, layout, values)]
    tables: dict[str, rans.Tables] = {}
    for name in dict.fromkeys(p[0] for p in parts):
        mine = [p for p in parts if p[0] == name]
        sym = np.concatenate([p[1] for p in mine])
        tables[name] = rans.Tables.fit(sym, np.concatenate([p[2] for p in mine]), mine[0][3],
                                       int(sym.max()) + 1 if sym.size else 1)
    return [(name, sym, ctx) for name, sym, ctx, _ in parts], tables


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
    blob = rows[0][COLUMN].tobytes()
    if any(r[COLUMN].size for r in rows[1:]):
        raise CorruptShardError("an entropy-coded unit has entropy bytes outside its first row")
    if len(blob) < 8:
        raise CorruptShardError(f"entropy column holds {len(blob)} bytes; at least 8 expected")
    lanes, tlen = (int(v) for v in np.frombuffer(blob[:8], "<u4"))
    end_tables, end_states = 8 + tlen, 8 + tlen + 4 * lanes
    if lanes < 1 or end_states > len(blob) or (len(blob) - end_states) % 2:
        raise CorruptShardError(f"entropy column of {len(blob)} bytes does not fit {lanes} lanes and "
                                f"{tlen} bytes of tables")
    tables = rans.unpack_tables(blob[8:end_tables])
    decoder = rans.Decoder(np.frombuffer(blob[end_tables:end_states], "<u4"), np.frombuffer(blob[end_states:], "<u2"))
    layout = _Layout(spec, rows)
    values: dict[str, np.ndarray] = {}
    for name, entries, ctx, _ in _streams(spec, layout, values):
        if name not in values:
            if len(values) >= len(tables):
                raise CorruptShardError(f"entropy column has {len(tables)} tables; more streams expected")
            values[name] = np.zeros(_stream_sizes(spec, layout, values)[name], dtype=np.int64)
        decoded = decoder.decode(ctx, tables[list(values).index(name)])
        if decoded.size and decoded.max() > _limits(spec)[name]:
            raise CorruptShardError(f"entropy column decodes a {name} value of {int(decoded.max())}; "
                                    f"at most {_limits(spec)[name]} is possible")
        if entries is None:
            values[name] = decoded
        else:
            values[name][entries] = decoded
    if len(values) != len(tables):
        raise CorruptShardError(f"entropy column has {len(tables)} tables for {len(values)} streams")
    decoder.finish()
    restored = from_blobs(unit.seq_ids, _split_rows(spec, layout, values)).columns
    kept = {name: col for name, col in unit.columns.items() if name != COLUMN}  # no copy of the rest
    return UnitRows(unit.seq_ids, {**kept, **restored}, keepalive=unit.keepalive)


def _split_rows(spec, layout: _Layout, values: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
    """Decoded streams → per-row column bytes, as :func:`encoding.encode_row` wrote them."""
    cd = _count_dtype(spec)
    out: dict[str, list[bytes]] = {}

    def split(name: str, data: np.ndarray, per_row: np.ndarray, dtype: str) -> None:
        cuts = np.cumsum(per_row)[:-1]
        if data.size != int(per_row.sum()):
            raise CorruptShardError(f"entropy column decodes {data.size} {name} values; {int(per_row.sum())} expected")
        if data.size and (data.min() < 0 or data.max() > np.iinfo(np.dtype(dtype)).max):
            raise CorruptShardError(f"entropy column decodes {name} values outside {dtype}")
        out[name] = [a.astype(dtype).tobytes() for a in np.split(data, cuts)]

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
            codes = values["head_logprobs"].reshape(-1, spec.k) + values["head_qmin"][:, None]
            split("head_logprobs", codes.ravel(), layout.positions * spec.k, "u1")
    return out
