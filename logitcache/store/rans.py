"""Interleaved rANS with static, context-conditioned frequency tables (pure numpy, vectorised over lanes).

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
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import CorruptShardError

PRECISION = 12
M = 1 << PRECISION
LOW = 1 << 16  # lower bound of a lane's state
# weight of table byte b >= 1: 2 ** ((b - 1) / 8), in integers (mantissas round(256 * 2 ** (i / 8)))
_MANT = np.array([256, 279, 304, 332, 362, 395, 431, 470], dtype=np.int64)
_B = np.arange(256, dtype=np.int64)
WEIGHTS = np.where(_B > 0, _MANT[(_B - 1) % 8] << ((_B - 1) // 8), 0)


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
    w = WEIGHTS[table_bytes.astype(np.int64)]
    total = w.sum(axis=1, keepdims=True)
    used = total[:, 0] > 0
    f = np.zeros_like(w)
    f[used] = np.maximum((w[used] * M) // total[used], (w[used] > 0).astype(np.int64))
    if np.any((table_bytes > 0).sum(axis=1) > M):
        # encoders fit tables within M symbols (entropy.MAX_SAMPLES): only a damaged shard's tables get here
        raise CorruptShardError(f"a context uses more than {M} symbols; the coder's precision cannot give each one")
    for c in np.flatnonzero(used):
        row = f[c]
        excess = int(row.sum()) - M
        while excess:
            top = int(np.argmax(row))
            if excess < 0 or row[top] - excess >= 1:
                row[top] -= excess
                excess = 0
            else:  # more cells than the largest can give up: take from the next largest
                take = int(row[top]) - 1
                row[top] = 1
                excess -= take
    return f


@dataclass
class Tables:
    """Frequencies ``freq[C, A]``, their prefix sums and a slot → symbol lookup per context."""

    table_bytes: np.ndarray  # uint8 [C, A]

    def __post_init__(self) -> None:
        self.freq = normalize(self.table_bytes)
        self.cum = np.cumsum(self.freq, axis=1) - self.freq
        self.contexts, self.alphabet = self.freq.shape

    @classmethod
    def fit(cls, symbols: np.ndarray, contexts: np.ndarray, num_contexts: int, alphabet: int) -> Tables:
        counts = np.bincount(contexts.astype(np.int64) * alphabet + symbols.astype(np.int64),
                             minlength=num_contexts * alphabet).reshape(num_contexts, alphabet)
        return cls(quantize_counts(counts))

    @cached_property
    def slot_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per (context, slot), flattened ``[C * M]``: the symbol (``-1`` in unused contexts), its
        frequency, and ``slot - cum``, so a decode step is three gathers and no arithmetic on tables."""
        sym = np.full((self.contexts, M), -1, dtype=np.int32)
        freq = np.zeros((self.contexts, M), dtype=np.int32)
        off = np.zeros((self.contexts, M), dtype=np.int32)
        used = self.freq.sum(axis=1) == M
        if used.any():
            f = self.freq[used].ravel()
            s = np.repeat(np.tile(np.arange(self.alphabet), int(used.sum())), f)
            sym[used] = s.reshape(-1, M)
            freq[used] = np.repeat(f, f).reshape(-1, M)
            off[used] = (np.arange(M) - np.repeat(self.cum[used].ravel(), f).reshape(-1, M))
        return sym.ravel(), freq.ravel(), off.ravel()


def _steps(n: int, lanes: int) -> range:
    return range((n + lanes - 1) // lanes)


def encode(streams: list[tuple[np.ndarray, np.ndarray, Tables]], lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """``streams`` of (symbols, contexts, tables) in decode order → (final states uint32[lanes], words uint16[])."""
    x = np.full(lanes, LOW, dtype=np.int64)  # states < 2**32: int64 arithmetic is exact
    emitted: list[np.ndarray] = []
    for symbols, contexts, tables in reversed(streams):
        s = symbols.astype(np.int64)
        c = contexts.astype(np.int64)
        if s.size and (s.min() < 0 or s.max() >= tables.alphabet):
            raise RuntimeError(f"internal: symbol outside the alphabet [0, {tables.alphabet}) of its fitted table")
        freq = tables.freq[c, s]
        cum = tables.cum[c, s]
        if s.size and freq.min() == 0:
            raise RuntimeError("internal: a symbol has no frequency in its context's fitted table")
        bound = freq << (32 - PRECISION)  # a state at or above this must emit a word first
        for j in reversed(_steps(s.size, lanes)):
            lo, hi = j * lanes, min(s.size, (j + 1) * lanes)
            xs = x[: hi - lo]
            out = xs >= bound[lo:hi]
            emitted.append((xs[out] & 0xFFFF)[::-1])
            xs = np.where(out, xs >> 16, xs)
            q, r = np.divmod(xs, freq[lo:hi])
            x[: hi - lo] = (q << PRECISION) + r + cum[lo:hi]
    words = np.concatenate(emitted)[::-1] if emitted else np.zeros(0, dtype=np.int64)
    return x.astype(np.uint32), words.astype(np.uint16)


class Decoder:
    """Decodes the streams of :func:`encode` one at a time, in order."""

    def __init__(self, states: np.ndarray, words: np.ndarray) -> None:
        self.x = states.astype(np.int64)  # states < 2**32 and every product below fits in int64
        self.words = words.astype(np.int64)
        self.pos = 0
        self.lanes = self.x.size

    def decode(self, contexts: np.ndarray, tables: Tables) -> np.ndarray:
        n = contexts.size
        out = np.empty(n, dtype=np.int64)
        if n == 0:
            return out
        c = contexts.astype(np.int64)
        if c.min() < 0 or c.max() >= tables.contexts:
            raise CorruptShardError("entropy-coded stream names a context outside its tables")
        sym, freq, off = tables.slot_tables
        base = c * M
        x, words, lanes = self.x, self.words, self.lanes
        for j in _steps(n, lanes):
            lo, hi = j * lanes, min(n, (j + 1) * lanes)
            xs = x[: hi - lo]
            k = base[lo:hi] + (xs & (M - 1))
            out[lo:hi] = sym[k]
            xs = freq[k] * (xs >> PRECISION) + off[k]
            need = xs < LOW
            m = int(np.count_nonzero(need))
            if m:
                if self.pos + m > words.size:
                    raise CorruptShardError("entropy-coded stream ends early")
                xs[need] = (xs[need] << 16) | words[self.pos: self.pos + m]
                self.pos += m
            x[: hi - lo] = xs
        if out.min() < 0:
            raise CorruptShardError("entropy-coded stream uses a context with an empty table")
        return out

    def finish(self) -> None:
        if self.pos != self.words.size or np.any(self.x != LOW):
            raise CorruptShardError(f"entropy-coded data does not end where it should "
                                    f"({self.pos} of {self.words.size} words read; lanes not at their start state)")


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
