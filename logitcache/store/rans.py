"""Interleaved rANS with static, context-conditioned frequency tables (numpy tables, numba-compiled coder loops).

The entropy stage of ``encoding.entropy = "ans"`` (docs/format.md, "Entropy coding"). Unlike zstd's
Huffman stage (whole bits per symbol, one table per block) it codes each symbol in its
information content under a table chosen by a *context* (for example a count given its id's gap
length), which is what skewed, correlated streams such as sample counts need.

- **Tables** (:class:`Tables`): one row of frequencies per context over an alphabet ``[0, A)``,
  summing to ``M = 2**PRECISION``. They are fitted to the symbols they code and stored with them as
  one byte per cell, ``b = 1 + round(8 log2 count)`` (``0``: never used), from which encoder and
  decoder derive the same integer frequencies (:func:`normalize`, integer arithmetic only).
- **Coder**: rANS with a 32-bit state in ``[2**16, 2**32)`` and 16-bit words, ``K`` interleaved
  lanes: symbol ``i`` of a stream goes to lane ``i % K``. Streams are coded one after another
  through the same lanes (a stream's contexts may depend on earlier streams), encoded last to
  first so they decode first to last. The decoder must end with every lane back at ``2**16`` and
  every word read: a cheap integrity check on top of the container's checksums.

The encode and decode loops, the tables' integer frequencies and the decoder's lookup arrays are
compiled by numba (``cache=True``: compiled once per machine and kept in ``__pycache__``); the tables'
packing and the checks on them stay in numpy. A decode step
runs 16 lanes at once (:mod:`logitcache.store.rans_lanes`: gathers from the slot tables, the
refill as an expand load), so a step of ``K`` lanes is ``K / 16`` vector steps.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np


from .jit import bind_on_first_use, njit_on_first_use
from ..errors import CorruptShardError

step16 = None  # rans_lanes.step16, bound when the kernels compile (that module imports numba)
bind_on_first_use(__name__, "step16", "logitcache.store.rans_lanes")

PRECISION = 12
M = 1 << PRECISION
LOW = 1 << 16  # lower bound of a lane's state
VECTOR = 16  # lanes per vector step (rans_lanes.WIDTH); the decoder pads the words by as many
# weight of table byte b >= 1: 2 ** ((b - 1) / 8), in integers (mantissas round(256 * 2 ** (i / 8)))
_MANT = np.array([256, 279, 304, 332, 362, 395, 431, 470], dtype=np.int64)
_B = np.arange(256, dtype=np.int64)
WEIGHTS = np.where(_B > 0, _MANT[(_B - 1) % 8] << ((_B - 1) // 8), 0)


_SCRATCH = threading.local()  # per thread: the buffers a decode needs only while it runs


def scratch(name: str, size: int, dtype: type | np.dtype) -> np.ndarray:
    """``size`` items of this thread's reusable buffer ``name`` (contents undefined, valid until the next
    call for ``name`` on this thread), for what one unit's decode needs only while it runs: a fresh buffer
    would touch new pages for every unit (~2.5 us per 4 KiB page on the benchmark VM, ~1 ms per top-64 unit pair)."""
    buffers, need = _SCRATCH.__dict__, size * np.dtype(dtype).itemsize
    if name not in buffers or buffers[name].size < need:
        buffers[name] = np.empty(need, dtype=np.uint8)
    return buffers[name][:need].view(dtype)


def quantize_counts(counts: np.ndarray) -> np.ndarray:
    """Counts → table bytes (``0`` for zero counts), encoder side only."""
    c = np.asarray(counts, dtype=np.float64)
    b = np.zeros(c.shape, dtype=np.uint8)
    nz = c > 0
    b[nz] = np.clip(1 + np.rint(8 * np.log2(c[nz])), 1, 255).astype(np.uint8)
    return b


def normalize(table_bytes: np.ndarray) -> np.ndarray:
    """Table bytes ``[C, A]`` → integer frequencies ``[C, A]`` summing to ``M`` per used context.

    Every cell with a nonzero byte gets at least 1; a context with no used cell stays all zero.
    The largest cell absorbs the rounding (and gives up what the floors of 1 took)."""
    f = np.empty(table_bytes.shape, dtype=np.int64)
    if _normalize_rows(np.ascontiguousarray(table_bytes, dtype=np.uint8), WEIGHTS, f):
        # encoders fit tables within M symbols (entropy.MAX_SAMPLES): only a damaged shard's tables get here
        raise CorruptShardError(f"a context uses more than {M} symbols; the coder's precision cannot give each one")
    return f


@njit_on_first_use
def _normalize_rows(table_bytes, weights, f):
    """Fill ``f`` with each row's frequencies (``f = max(w * M // sum w, 1)`` for used cells, then
    :func:`_absorb_rounding`); returns whether a row uses more than ``M`` cells (``f`` is then not to be used)."""
    for c in range(table_bytes.shape[0]):
        total, cells = 0, 0
        for s in range(table_bytes.shape[1]):
            total += weights[table_bytes[c, s]]
            cells += table_bytes[c, s] > 0
        if cells > M:
            return True
        for s in range(table_bytes.shape[1]):
            w = weights[table_bytes[c, s]]
            f[c, s] = max((w * M) // total, 1) if w else 0
        if total:
            _absorb_rounding(f[c])
    return False


@njit_on_first_use
def _absorb_rounding(row):
    """Bring a used row to sum ``M``: the largest cell (the first of equals) takes the difference, or
    gives up all but 1 and passes the rest of it on to the next largest."""
    excess = row.sum() - M
    while excess:
        top = np.argmax(row)
        if excess < 0 or row[top] - excess >= 1:
            row[top] -= excess
            excess = 0
        else:
            take = row[top] - 1
            row[top] = 1
            excess -= take


@dataclass
class Tables:
    """Frequencies ``freq[C, A]``, their prefix sums and the decoder's :class:`Lookup` (:attr:`lookup`)."""

    table_bytes: np.ndarray  # uint8 [C, A]

    def __post_init__(self) -> None:
        self.freq = normalize(self.table_bytes)
        self.contexts, self.alphabet = self.freq.shape

    @cached_property
    def cum(self) -> np.ndarray:
        """``cum[C, A]``: each symbol's start, the prefix sums of its context's frequencies (encoder side)."""
        return np.cumsum(self.freq, axis=1) - self.freq

    @classmethod
    def fit(cls, symbols: np.ndarray, contexts: np.ndarray, num_contexts: int, alphabet: int) -> Tables:
        counts = np.bincount(contexts.astype(np.int64) * alphabet + symbols.astype(np.int64),
                             minlength=num_contexts * alphabet).reshape(num_contexts, alphabet)
        return cls(quantize_counts(counts))

    @cached_property
    def lookup(self) -> Lookup:
        """The decoder's view of the tables (:class:`Lookup`), built on first use."""
        if self.alphabet > M:  # every coded stream has fewer values (entropy._limits): a damaged table
            raise CorruptShardError(f"an entropy table has {self.alphabet} symbols; at most {M} are possible")
        used = int(np.count_nonzero(self.freq.sum(axis=1) == M))  # normalize gives a context M or nothing
        rows, fc = np.empty(self.contexts, dtype=np.int32), np.empty((used, self.alphabet), dtype=np.int32)
        slots = np.empty(used * M + 4, dtype=self.symbol_dtype())  # + what a 4-byte gather reads past the end
        slots[used * M:] = 0
        _fill_lookup(self.freq, rows, fc, slots)
        return Lookup(rows, slots, fc)

    def symbol_dtype(self) -> type:
        """The smallest unsigned dtype that holds every symbol of the alphabet."""
        return np.uint8 if self.alphabet <= 256 else np.uint16


@dataclass(frozen=True)
class Lookup:
    """What a decode step reads, for the used contexts only (a unit's tables leave many unused):

    - ``rows int32[C]``: a context's row among the used ones, ``-1`` for an unused context;
    - ``slots uint8|uint16[U * M + 4]``: per (row, slot) the symbol whose range holds the slot (the
      vector step reads 4 bytes at each, hence the padding);
    - ``fc int32[U, A]``: per (row, symbol) ``freq << PRECISION | cum``, one load for both."""

    rows: np.ndarray
    slots: np.ndarray
    fc: np.ndarray


@njit_on_first_use
def _fill_lookup(freq, rows, fc, slots):
    """:class:`Lookup`'s arrays from the frequencies: the used contexts (those summing to ``M``) in order."""
    used = 0
    for c in range(freq.shape[0]):
        if freq[c].sum() != M:
            rows[c] = -1
            continue
        rows[c], start = used, 0
        for s in range(freq.shape[1]):
            fc[used, s] = (freq[c, s] << PRECISION) | start
            slots[used * M + start: used * M + start + freq[c, s]] = s
            start += freq[c, s]
        used += 1


@njit_on_first_use
def _encode_stream(x, symbols, contexts, freq, cum, words, emitted):
    """Code one stream last symbol first into lane states ``x``; the words each symbol emits go
    to ``words[emitted:]`` in that (reverse) order. Returns the new ``emitted``, or ``-1 - i`` if
    symbol ``i`` has no frequency in its context."""
    lanes, lane = x.size, (symbols.size - 1) % x.size  # symbol i goes to lane i % lanes
    for i in range(symbols.size - 1, -1, -1):
        c, s = contexts[i], symbols[i]
        f = freq[c, s]
        if f == 0:
            return -1 - i
        xs = x[lane]
        if xs >= f << (32 - PRECISION):  # a state at or above this must emit a word first
            words[emitted] = xs & 0xFFFF
            emitted += 1
            xs >>= 16
        x[lane] = ((xs // f) << PRECISION) + xs % f + cum[c, s]
        lane = lane - 1 if lane else lanes - 1
    return emitted


def encode(streams: list[tuple[np.ndarray, np.ndarray, Tables]], lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """``streams`` of (symbols, contexts, tables) in decode order → (final states uint32[lanes], words uint16[])."""
    x = np.full(lanes, LOW, dtype=np.int64)  # states < 2**32: int64 arithmetic is exact
    words = np.empty(sum(s.size for s, _, _ in streams), dtype=np.uint16)  # at most one word per symbol
    emitted = 0
    for symbols, contexts, tables in reversed(streams):
        s = np.asarray(symbols, dtype=np.int64)
        if s.size and (s.min() < 0 or s.max() >= tables.alphabet):
            raise RuntimeError(f"internal: symbol outside the alphabet [0, {tables.alphabet}) of its fitted table")
        c = np.asarray(contexts, dtype=np.int64)
        if c.size and (c.min() < 0 or c.max() >= tables.contexts):
            raise RuntimeError(f"internal: context outside the {tables.contexts} contexts of its fitted table")
        emitted = _encode_stream(x, s, c, tables.freq, tables.cum, words, emitted)
        if emitted < 0:
            raise RuntimeError("internal: a symbol has no frequency in its context's fitted table")
    return x.astype(np.uint32), words[:emitted][::-1].copy()


ENDS_EARLY, EMPTY_CONTEXT, OUTSIDE_TABLES = -1, -2, -3  # what decode_stream returns instead of a word position


@njit_on_first_use
def decode_step(x, contexts, c0, rows, slots, fc, words, pos, size, out, o0, n):
    """Decode one step of ``n <= lanes`` symbols, symbol ``j`` from lane ``j`` under context
    ``contexts[c0 + j]`` into ``out[o0 + j]``, refilling from ``words[pos:]`` (lanes in order). Returns
    the new ``pos``, ``EMPTY_CONTEXT``, ``OUTSIDE_TABLES`` (a context not in ``[0, rows.size)``), or
    ``ENDS_EARLY`` once it passes the ``size`` coded words (``words`` holds ``VECTOR`` padding words
    past them, so a vector step never reads outside it)."""
    for lane in range(0, n, VECTOR):
        pos = step16(x, lane, contexts, c0 + lane, rows, slots, fc, words, pos, out, o0 + lane, min(VECTOR, n - lane))
        if pos < 0:
            return pos
        if pos > size:
            return ENDS_EARLY
    return pos


@njit_on_first_use
def decode_stream(x, words, pos, size, contexts, rows, slots, fc, out):
    """Decode ``out.size`` symbols, first to last (symbol ``i`` from lane ``i % lanes``, under context
    ``contexts[i]``); returns what :func:`decode_step` does."""
    lanes = x.size
    for i in range(0, out.size, lanes):
        pos = decode_step(x, contexts, i, rows, slots, fc, words, pos, size, out, i, min(lanes, out.size - i))
        if pos < 0:
            break
    return pos


class Decoder:
    """Decodes the streams of :func:`encode` one at a time, in order. With ``reuse`` the words are held in
    this thread's :func:`scratch` buffer: one such decoder per thread at a time (``entropy.unpack_unit``'s)."""

    def __init__(self, states: np.ndarray, words: np.ndarray, reuse: bool = False) -> None:
        if states.size == 0:
            raise CorruptShardError("entropy-coded data has no lanes; at least 1 expected")
        self.x = states.astype(np.uint32)  # a decode step never raises a state (x' <= x), a refill stays < 2**32
        self.size = int(np.asarray(words).size)
        padded = self.size + VECTOR  # + the padding a vector step may read
        self.words = scratch("words", padded, np.uint16) if reuse else np.empty(padded, dtype=np.uint16)
        self.words[:self.size], self.words[self.size:] = words, 0
        self.pos = 0

    def check(self, contexts: int, tables: Tables) -> None:
        """Refuse tables with fewer than the ``contexts`` a stream's contexts may name."""
        if tables.contexts < contexts:
            raise CorruptShardError(f"entropy tables have {tables.contexts} contexts; the stream uses up to {contexts}")

    def advance(self, pos: int) -> None:
        """Take the word position a compiled decode returned (or the error it stands for)."""
        if pos == ENDS_EARLY:
            raise CorruptShardError("entropy-coded stream ends early")
        if pos == EMPTY_CONTEXT:
            raise CorruptShardError("entropy-coded stream uses a context with an empty table")
        if pos == OUTSIDE_TABLES:
            raise CorruptShardError("entropy-coded stream names a context outside its tables")
        self.pos = pos

    def decode(self, contexts: np.ndarray, tables: Tables) -> np.ndarray:
        """The next stream's symbols (in :meth:`Tables.symbol_dtype`) under ``contexts`` (any integer dtype)."""
        c = np.asarray(contexts)
        out = np.empty(c.size, dtype=tables.symbol_dtype())
        if c.size:
            t = tables.lookup
            self.advance(decode_stream(self.x, self.words, self.pos, self.size, c, t.rows, t.slots, t.fc, out))
        return out

    def finish(self) -> None:
        if self.pos != self.size or np.any(self.x != LOW):
            raise CorruptShardError(f"entropy-coded data does not end where it should "
                                    f"({self.pos} of {self.size} words read; lanes not at their start state)")


def pack_tables(tables: list[Tables]) -> bytes:
    """Shapes (uint32 pairs) then every table's bytes, zlib-compressed."""
    head = np.array([t.table_bytes.shape for t in tables], dtype="<u4").reshape(-1)
    body = b"".join(np.ascontiguousarray(t.table_bytes, dtype=np.uint8).tobytes() for t in tables)
    return zlib.compress(np.uint32(len(tables)).astype("<u4").tobytes() + head.tobytes() + body, 9)


def unpack_tables(blob: bytes) -> list[Tables]:
    try:
        raw = zlib.decompress(blob)
    except zlib.error as exc:
        raise CorruptShardError(f"entropy tables do not decompress: {exc}") from None
    if len(raw) < 4:
        raise CorruptShardError("entropy tables are truncated")
    count = int(np.frombuffer(raw[:4], "<u4")[0])
    shapes = np.frombuffer(raw[4: 4 + 8 * count], "<u4").reshape(-1, 2) if count else np.zeros((0, 2), np.uint32)
    if shapes.shape[0] != count:
        raise CorruptShardError("entropy tables are truncated")
    pos, out = 4 + 8 * count, []
    for rows, cols in shapes.astype(np.int64):
        size = int(rows * cols)
        if pos + size > len(raw):
            raise CorruptShardError("entropy tables are truncated")
        out.append(Tables(np.frombuffer(raw[pos: pos + size], np.uint8).reshape(rows, cols)))
        pos += size
    if pos != len(raw):
        raise CorruptShardError("entropy tables have trailing bytes")
    return out
