"""A unit's rows decoded all at once: the values :func:`~logitcache.store.row_decode.decode_row` gives row by
row (docs/format.md, "Encoding"), from vectorised passes over the unit's concatenated byte columns.

A container hands a unit over as one byte array per column plus row offsets (:class:`UnitRows`), so each
stream of every row is decoded in one numpy pass over the whole unit: every bit field (mantissas, packed ids)
is read from the 64-bit window at its first byte (its offset: one cumulative sum), gaps become ranks by one
cumulative sum, byte planes are gathered per row. The sampled entries (ids, counts, the label first, the sort
by id) and the heads (ids, the label first, the sort by log-probability then id) are decoded by compiled passes
over the unit (:mod:`logitcache.store.unit_decode_jit`, numba, loaded on the first decode);
``decode_unit(..., compiled=False)`` takes the numpy passes instead, the reference the kernels are tested against:
a position's entries laid out as a row of a ``[positions, longest]`` matrix of ``id · longest + column`` keys and
sorted row by row (stable, as the row path's argsort), a head matrix sorted by the row path's lexsort.

:func:`decode_unit` takes the columns it :func:`handles` (every encoding, method, layout and
``label_logprob``); a unit with another column (a newer format) is decoded row by row through
``decode_row`` (:class:`RowsByRow`). Both give rows as ``(seq_id, tokens int32[L], train mask | None,
SparseTargets)``; the decoded unit's arrays back every row's tensors (views, no copies). A stream of the
wrong size, a rank or id outside the vocabulary, a sample count below 1, train-mask bits past the row's end
or a label log-probability that is none raise :class:`CorruptShardError` naming the row, as the row path does;
so does a label outside the vocabulary flagged as an entry (which the row path decodes into a wrong order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import numpy as np
import torch

from ..errors import CorruptShardError
from ..targets import SparseTargets
from .bits import MAX_BITS
from .encoding import Encoding, _decode_logprobs
from .row_decode import _with_label_first, decode_row, row_mask
from .planes import LABEL_COLUMN, unsplit
from .spec import ShardSpec
from .totals import count_dtype
from . import unit_decode_jit as kernel
from .units import UnitRows

__all__ = ["DecodedUnit", "Row", "RowsByRow", "decode_unit", "handles", "unit_rows"]

# every column decode_unit reads (finish_reason is read by row_finish, not by the targets); another column
# (a newer row format) sends the unit down the row-by-row path: the one place to add a column
HANDLED = frozenset({"tokens", "train_mask", "finish_reason", "head_label", "head_ids", "head_id_bits",
                     "head_logprobs", "tail_mass", "sample_lengths", "sample_label", "sample_ids", "sample_id_bits",
                     "sample_counts", "sample_weights", LABEL_COLUMN})
# what a damaged stream holds, said alike by the numpy passes and the compiled kernel
GAMMA_SYMBOL = "gamma symbol above {bits} in {part}_ids"
OUTSIDE = "decoded {what} outside the vocabulary of {vocab} in {column}"
COUNT_BELOW_1 = "decoded a sample count below 1"
POSITION_FIELDS = ("head_ids", "head_logprobs", "tail_mass", "sample_lengths", "label_logprobs")
ENTRY_FIELDS = ("sample_ids", "sample_counts", "sample_weights")

Row = tuple[int, np.ndarray, "np.ndarray | None", SparseTargets]  # seq_id, tokens int32[L], mask, targets


class UnitReader(Protocol):
    def __len__(self) -> int: ...
    def row(self, r: int) -> Row: ...


def handles(columns: Iterable[str]) -> bool:
    """Whether :func:`decode_unit` decodes rows of these columns (else :class:`RowsByRow` does)."""
    return set(columns) <= HANDLED


def unit_rows(spec: ShardSpec, rows: UnitRows, index: int) -> UnitReader:
    """The rows of unit ``index``: decoded at once where :func:`handles` their columns (a damaged one raises
    :class:`CorruptShardError` naming the unit and row), else row by row."""
    if not handles(rows.columns):
        return RowsByRow(spec, rows)
    try:
        return decode_unit(spec, rows)
    except CorruptShardError as exc:
        raise CorruptShardError(f"shard {index}: {exc}") from None


class RowsByRow:
    """Rows decoded one at a time by ``decode_row`` when asked for (the reference path)."""

    def __init__(self, spec: ShardSpec, rows: UnitRows) -> None:
        self.spec, self.rows = spec, rows

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, r: int) -> Row:
        columns, spec = self.rows.row(r), self.spec
        tokens, targets = decode_row(spec.encoding, spec.method, spec.num_samples, spec.k, columns)
        return int(self.rows.seq_ids[r]), tokens, row_mask(columns), targets


@dataclass
class DecodedUnit:
    """Every row of a unit decoded: flat arrays and where each row's part starts."""

    method: str
    num_samples: int
    seq_ids: np.ndarray  # uint64[R]
    tokens: np.ndarray  # int32[sum L], rows end to end
    token_off: np.ndarray  # int64[R + 1]
    mask: np.ndarray | None  # bool[sum (L - 1)]: the train masks of a masked unit, rows end to end
    pos_off: np.ndarray  # int64[R + 1]: each row's target positions
    entry_off: np.ndarray | None  # int64[R + 1]: each row's sampled entries
    fields: dict[str, np.ndarray]  # SparseTargets fields: POSITION_FIELDS by position, ENTRY_FIELDS by entry

    def __len__(self) -> int:
        return int(self.seq_ids.size)

    def row(self, r: int) -> Row:
        p0, p1 = int(self.pos_off[r]), int(self.pos_off[r + 1])
        parts = {name: torch.from_numpy(self.fields[name][p0:p1]) for name in POSITION_FIELDS if name in self.fields}
        if self.entry_off is not None:
            e0, e1 = int(self.entry_off[r]), int(self.entry_off[r + 1])
            parts.update({name: torch.from_numpy(self.fields[name][e0:e1])
                          for name in ENTRY_FIELDS if name in self.fields})
        t0, t1 = int(self.token_off[r]), int(self.token_off[r + 1])
        mask = None if self.mask is None else self.mask[t0 - r:t1 - r - 1]  # a masked row has L - 1 >= 1 flags
        targets = SparseTargets(method=self.method, num_samples=self.num_samples, **parts)
        return int(self.seq_ids[r]), self.tokens[t0:t1], mask, targets


class _Columns:
    """The unit's byte columns, each checked row by row against the size its rows need."""

    def __init__(self, rows: UnitRows) -> None:
        self.rows = rows

    def bytes(self, name: str, expected: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(values uint8[...], offsets int64[R + 1] from 0)`` of column ``name``; with ``expected``
        (bytes per row) a row of another size raises."""
        values, off = self.rows.columns[name]
        sizes = np.diff(off)
        if expected is not None:
            self.check(sizes != expected, lambda r: f"column {name} holds {sizes[r]} bytes; {expected[r]} expected")
        return values[off[0]:off[-1]], off - off[0]

    def check(self, bad_rows: np.ndarray, message: Callable[[int], str]) -> None:
        """Raise for the first row where ``bad_rows`` (bool[R]) holds: ``message(row)`` after the row's name."""
        bad = np.flatnonzero(bad_rows)
        if bad.size:
            self.fail(int(bad[0]), message(int(bad[0])))

    def fail(self, r: int, message: str) -> None:
        """Raise CorruptShardError for row ``r``: its name, then ``message``."""
        raise CorruptShardError(f"row {r} (seq_id {int(self.rows.seq_ids[r])}): {message}")

    def check_entries(self, bad: np.ndarray, off: np.ndarray, message: Callable[[int], str]) -> None:
        """:meth:`check` for ``bad`` given per entry (row ``r``'s entries are ``off[r]:off[r + 1]``)."""
        if bad.any():
            self.check(_segment_sums(bad, off) > 0, message)

    def plain(self, name: str, counts: np.ndarray, dtype: str) -> np.ndarray:
        """``counts[r]`` values of ``dtype`` per row, stored as they are (lengths, counts)."""
        values, _ = self.bytes(name, counts * np.dtype(dtype).itemsize)
        return values.view(dtype)

    def plane_bytes(self, name: str, counts: np.ndarray, size: int) -> np.ndarray:
        """The byte planes of ``counts[r]`` values of ``size`` bytes per row (each row stored as
        :func:`~logitcache.store.planes.split` writes it) as one unit-wide stream of planes."""
        values, off = self.bytes(name, counts * size)
        if size == 1:
            return values
        starts = off[:-1]
        return np.concatenate([values[s + b * n:s + (b + 1) * n] for b in range(size) for s, n in zip(starts, counts)])

    def planes(self, name: str, counts: np.ndarray, dtype: str) -> np.ndarray:
        """``counts[r]`` values of ``dtype`` per row, stored as byte planes."""
        return unsplit(self.plane_bytes(name, counts, np.dtype(dtype).itemsize), dtype, int(counts.sum()))

    def bits(self, name: str, counts: np.ndarray, *, strict: bool = False) -> np.ndarray:
        """``bool`` flags, ``counts[r]`` per row packed MSB first (``np.packbits``); ``strict``: bits past a
        row's last flag must be 0 (the train mask's rule)."""
        values, off = self.bytes(name, -(-counts // 8))
        bits = np.unpackbits(values)
        first = np.concatenate([[0], np.cumsum(counts)])
        flags = bits[np.repeat(off[:-1] * 8 - first[:-1], counts) + np.arange(first[-1])].astype(bool)
        if strict:
            self.check(_segment_sums(bits, off * 8) != _segment_sums(flags, first),
                       lambda r: f"{name} has bits set past the row's last position")
        return flags


def _segment_sums(values: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Sums of ``values`` over ``[off[i], off[i + 1])`` (empty segments give 0)."""
    c = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return c[off[1:]] - c[off[:-1]]


def _position_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of ``values`` over consecutive runs of ``lengths`` (a run of 0 sums to 0)."""
    if not values.size:
        return np.zeros(lengths.size, dtype=np.int64)
    starts = np.minimum(np.cumsum(lengths) - lengths, values.size - 1)
    return np.where(lengths > 0, np.add.reduceat(values, starts), 0)


def _fields(cols: _Columns, name: str, widths: np.ndarray, value_off: np.ndarray) -> np.ndarray:
    """The bit fields of column ``name``: ``widths`` (at most 32 bits each, MSB first; row ``r``'s are
    ``value_off[r]:value_off[r + 1]``), each row's stream on bytes of its own (checked: as many as its fields
    need). Every field is read from the 64 bits starting at its first byte (:mod:`logitcache.store.bits`)."""
    ends = np.zeros(widths.size + 1, dtype=np.int64)
    np.cumsum(widths, out=ends[1:])  # bits before each field, the unit's rows end to end
    data, byte_off = cols.bytes(name, -(-(ends[value_off[1:]] - ends[value_off[:-1]]) // 8))
    if not widths.size:
        return np.zeros(0, dtype=np.int64)
    bit = ends[:-1] + np.repeat(byte_off[:-1] * 8 - ends[value_off[:-1]], np.diff(value_off))
    buf = np.zeros(data.size + 8, dtype=np.uint8)
    buf[:data.size] = data
    windows = np.ndarray((data.size + 1,), dtype=">u8", buffer=buf, strides=(1,))  # bytes i .. i + 7, big-endian
    top = windows[bit >> 3].astype(np.uint64) << (bit & 7).astype(np.uint64)  # the field's first bit at bit 63
    return ((top >> np.uint64(1)) >> (63 - widths).astype(np.uint64)).astype(np.int64)  # width 0 gives 0


def _ids(enc: Encoding, cols: _Columns, part: str, rest_len: np.ndarray, pos_off: np.ndarray) -> np.ndarray:
    """The unit's ids of ``part`` (``head``/``sample``) not flagged as labels: ``rest_len[p]`` per position."""
    counts = _segment_sums(rest_len, pos_off)  # per row
    value_off = np.concatenate([[0], np.cumsum(counts)])
    if enc.ids == "rank-delta":
        return _rank_delta_ids(enc, cols, part, rest_len, counts, value_off)
    ids = _fields(cols, f"{part}_id_bits", np.full(int(value_off[-1]), enc.id_width, np.int64), value_off)
    cols.check_entries(ids >= enc.vocab_size, value_off,
                       lambda r: OUTSIDE.format(what="id", vocab=enc.vocab_size, column=f"{part}_id_bits"))
    return ids


def _rank_delta_ids(enc: Encoding, cols: _Columns, part: str, rest_len: np.ndarray, counts: np.ndarray,
                    value_off: np.ndarray) -> np.ndarray:
    """Gamma-coded rank gaps (symbols in ``{part}_ids``, mantissas in ``{part}_id_bits``) → ids."""
    symbols, _ = cols.bytes(f"{part}_ids", counts)
    cols.check_entries(symbols > MAX_BITS, value_off, lambda r: GAMMA_SYMBOL.format(bits=MAX_BITS, part=part))
    widths = np.maximum(symbols.astype(np.int64) - 1, 0)
    gaps = (symbols > 0).astype(np.int64) << widths | _fields(cols, f"{part}_id_bits", widths, value_off)
    csum = np.cumsum(gaps)
    first = np.cumsum(rest_len) - rest_len  # each position's first entry
    before = np.where(first > 0, csum[np.maximum(first - 1, 0)] if csum.size else 0, 0)
    ranks = csum - np.repeat(before, rest_len)
    cols.check_entries(ranks >= enc.vocab_size, value_off,
                       lambda r: OUTSIDE.format(what="rank", vocab=enc.vocab_size, column=f"{part}_ids"))
    return enc._unrank[ranks]  # ids of the vocabulary, every one


def _flagged_labels(cols: _Columns, flags: np.ndarray, labels: np.ndarray, pos_off: np.ndarray, vocab: int,
                    part: str) -> None:
    """A label stands in for a stored entry only if it is an id of the vocabulary (the row path, which does not
    check, would sort such an entry into the next position)."""
    cols.check_entries(flags & ((labels < 0) | (labels >= vocab)), pos_off,
                       lambda r: f"{part}_label flags a label outside the vocabulary of {vocab} as a stored entry")


def _label_first_by_id(flags: np.ndarray, lengths: np.ndarray, vocab: int, labels: np.ndarray,
                       rest: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each position's entries in stored order (its label first where ``flags``, then its ``rest``) laid out as
    the rows of a ``[positions, longest]`` matrix, and the stable sort of each row by id: ``(filled bool[P, L],
    ids int[E] in that order, source [P, L]: the stored column of each sorted entry)``. Ties keep the stored
    order, as the row path's ``argsort(pos · V + id, kind="stable")``."""
    longest = int(lengths.max()) if lengths.size else 0
    col = np.arange(longest)
    filled = col < lengths[:, None]
    dtype = np.int32 if (vocab + 1) * longest < 2**31 else np.int64
    keys = np.zeros(filled.shape, dtype=dtype)
    keys[filled & (col >= flags[:, None])] = rest * longest
    keys[flags, 0] = labels[flags] * longest
    keys += col.astype(dtype)
    keys[~filled] = vocab * longest  # after every id
    keys.sort(axis=1)
    return filled, keys[filled] // longest, keys % longest


def decode_unit(spec: ShardSpec, rows: UnitRows, *, compiled: bool = True) -> DecodedUnit:
    """Every row of ``rows`` decoded (the columns must be ones :func:`handles`); ``compiled``: the sampled entries
    and the heads by the compiled kernels (:mod:`logitcache.store.unit_decode_jit`), else by numpy passes."""
    cols = _Columns(rows)
    data, off = cols.bytes("tokens")
    cols.check(np.diff(off) % 4 != 0, lambda r: "tokens column holds a partial int32")
    tokens, token_off = data.view("<i4").astype(np.int32), off // 4
    lengths = np.diff(token_off)
    starts = token_off[:-1][lengths > 0]
    keep = np.ones(tokens.size, dtype=bool)
    keep[starts] = False
    labels, positions = tokens[keep].astype(np.int64), np.maximum(lengths - 1, 0)
    mask = None
    if "train_mask" in rows.columns:
        cols.check(positions < 1, lambda r: f"a masked row holds {lengths[r]} token(s); expected at least 2")
        mask = cols.bits("train_mask", positions, strict=True)
        labels, positions = labels[mask], _segment_sums(mask, np.concatenate([[0], np.cumsum(positions)]))
    pos_off = np.concatenate([[0], np.cumsum(positions)])
    fields: dict[str, np.ndarray] = {}
    entry_off = None
    if "head_ids" in rows.columns:
        fields.update(_head(spec, cols, labels, positions, pos_off, compiled))
    if "sample_ids" in rows.columns:
        sample, entry_off = _sample(spec, cols, labels, positions, pos_off, compiled)
        fields.update(sample)
    if LABEL_COLUMN in rows.columns:
        values = cols.planes(LABEL_COLUMN, positions, "<f4")
        bad = ~(np.isfinite(values) & (values <= 0))
        cols.check_entries(bad, pos_off, lambda r: "label_logprob holds a value that is no log-probability (NaN, "
                           "inf or > 0)")
        fields["label_logprobs"] = values.astype(np.float32)
    return DecodedUnit(spec.method, spec.num_samples if entry_off is not None else 0, rows.seq_ids, tokens, token_off,
                       mask, pos_off, entry_off, fields)


def _head(spec: ShardSpec, cols: _Columns, labels: np.ndarray, positions: np.ndarray, pos_off: np.ndarray,
          compiled: bool) -> dict[str, np.ndarray]:
    enc, k, count = spec.encoding, spec.k, int(positions.sum())
    flags = cols.bits("head_label", positions)
    _flagged_labels(cols, flags, labels, pos_off, enc.vocab_size, "head")
    rest_len = k - flags.astype(np.int64)
    size = {"float32": 4, "float16": 2, "q8": 1}[enc.logprobs]
    lp = _decode_logprobs(enc, cols.plane_bytes("head_logprobs", positions * k, size), count * k).reshape(count, k)
    entries = _compiled_head if compiled else _numpy_head  # the one place the kernel is chosen
    ids, lp = entries(enc, cols, flags, labels, rest_len, pos_off, lp)
    return {"head_ids": ids, "head_logprobs": lp,
            "tail_mass": cols.planes("tail_mass", positions, enc.tail_dtype).astype(np.float32)}


def _numpy_head(enc: Encoding, cols: _Columns, flags: np.ndarray, labels: np.ndarray, rest_len: np.ndarray,
                pos_off: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32[P, k], logprobs [P, k])``: each position's head sorted as ``decode_row`` sorts it (numpy)."""
    rest_ids = _ids(enc, cols, "head", rest_len, pos_off)
    ids = _with_label_first(flags, labels, rest_ids, rest_len).reshape(lp.shape)
    order = np.lexsort((ids, -lp), axis=1)
    return np.take_along_axis(ids, order, 1).astype(np.int32), np.take_along_axis(lp, order, 1)


def _compiled_head(enc: Encoding, cols: _Columns, flags: np.ndarray, labels: np.ndarray, rest_len: np.ndarray,
                   pos_off: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_numpy_head` by the compiled kernel (:func:`~logitcache.store.unit_decode_jit.head_entries`); a damaged
    row raises as there."""
    rank_delta = enc.ids == "rank-delta"
    symbols = cols.bytes("head_ids", _segment_sums(rest_len, pos_off))[0] if rank_delta else np.zeros(0, np.uint8)
    bits, bits_off = cols.bytes("head_id_bits")
    unrank = enc._unrank if rank_delta else np.zeros(0, np.int64)
    ids, out, status = kernel.head_entries(rank_delta, enc.id_width, symbols, bits, bits_off, pos_off, rest_len,
                                           flags, labels, lp, unrank, enc.vocab_size)
    _raise_status(enc, cols, status, "head")
    return ids, out


def _sample(spec: ShardSpec, cols: _Columns, labels: np.ndarray, positions: np.ndarray, pos_off: np.ndarray,
            compiled: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    enc, n = spec.encoding, spec.num_samples
    flags = cols.bits("sample_label", positions)
    _flagged_labels(cols, flags, labels, pos_off, enc.vocab_size, "sample")
    rest_len = cols.plain("sample_lengths", positions, count_dtype(n)).astype(np.int64)
    stored_counts = cols.plain("sample_counts", _segment_sums(rest_len, pos_off), count_dtype(n))
    lengths = rest_len + flags
    entry_off = np.concatenate([[0], np.cumsum(lengths)])[pos_off]
    entries = _compiled_entries if compiled else _numpy_entries  # the one place the kernel is chosen
    ids, counts, source = entries(enc, cols, n, flags, labels, rest_len, stored_counts, pos_off)
    out = {"sample_lengths": lengths.astype(np.int32), "sample_ids": ids, "sample_counts": counts}
    if "sample_weights" in cols.rows.columns:
        out["sample_weights"] = cols.planes("sample_weights", np.diff(entry_off), "<f4")[source]
    return out, entry_off


def _numpy_entries(enc: Encoding, cols: _Columns, n: int, flags: np.ndarray, labels: np.ndarray, rest_len: np.ndarray,
                   stored_counts: np.ndarray, pos_off: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids int32[E], counts int32[E], source int64[E])``: every position's entries sorted by id, and where each
    stood in the label-first stored order (:func:`_with_label_first`), by numpy passes over the unit (the
    reference of :func:`~logitcache.store.unit_decode_jit.sample_entries`)."""
    rest_ids = _ids(enc, cols, "sample", rest_len, pos_off)
    rest_counts = stored_counts.astype(np.int32) + 1
    label_counts = n - _position_sums(rest_counts, rest_len)
    cols.check_entries(flags & (label_counts < 1), pos_off, lambda r: COUNT_BELOW_1)
    lengths = rest_len + flags
    filled, ids, column = _label_first_by_id(flags, lengths, enc.vocab_size, labels, rest_ids)
    source = ((np.cumsum(lengths) - lengths)[:, None] + column)[filled]
    counts = _with_label_first(flags, label_counts, rest_counts, rest_len)[source]
    return ids.astype(np.int32), counts.astype(np.int32), source


def _compiled_entries(enc: Encoding, cols: _Columns, n: int, flags: np.ndarray, labels: np.ndarray,
                      rest_len: np.ndarray, stored_counts: np.ndarray,
                      pos_off: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_numpy_entries` by the compiled kernel (:func:`~logitcache.store.unit_decode_jit.sample_entries`);
    a damaged row raises as there."""
    rank_delta = enc.ids == "rank-delta"
    symbols = cols.bytes("sample_ids", _segment_sums(rest_len, pos_off))[0] if rank_delta else np.zeros(0, np.uint8)
    bits, bits_off = cols.bytes("sample_id_bits")
    unrank = enc._unrank if rank_delta else np.zeros(0, np.int64)
    ids, counts, source, status = kernel.sample_entries(rank_delta, enc.id_width, symbols, bits, bits_off, pos_off,
                                                        rest_len, flags, labels, stored_counts, n, unrank,
                                                        enc.vocab_size)
    _raise_status(enc, cols, status, "sample")
    return ids, counts, source


def _raise_status(enc: Encoding, cols: _Columns, status: np.ndarray, part: str) -> None:
    """Raise the damage a kernel returned in ``status`` (nothing where ``status[0]`` is 0), naming its row."""
    if status[0]:
        code, row, found, expected = (int(v) for v in status)
        cols.fail(row, {kernel.BAD_GAMMA: GAMMA_SYMBOL.format(bits=MAX_BITS, part=part),
                        kernel.BAD_SIZE: f"column {part}_id_bits holds {found} bytes; {expected} expected",
                        kernel.BAD_RANK: OUTSIDE.format(what="rank", vocab=enc.vocab_size, column=f"{part}_ids"),
                        kernel.BAD_ID: OUTSIDE.format(what="id", vocab=enc.vocab_size, column=f"{part}_id_bits"),
                        kernel.BAD_COUNT: COUNT_BELOW_1}[code])
