"""Bit-level integer codes used by the compact encodings (pure numpy, vectorised).

- :func:`pack_fixed` / :func:`unpack_fixed`: every value in ``width`` bits, MSB first.
- :func:`gamma_split` / :func:`unpack_gamma_split`: an Elias-gamma-like code split in two streams. Value
  ``v >= 0`` becomes a *symbol* byte ``s = bit_length(v)`` (0 for 0) and a *mantissa*, the ``s - 1``
  bits below the leading one. Symbols are bytes so the container's entropy coder (zstd's Huffman
  stage) models their skewed distribution; mantissas are nearly uniform, so they are packed raw.
  Values up to ``2**32 - 1`` fit; nothing is ever truncated.

Values that do not fit raise :class:`TargetsError`; streams of the wrong size (only a damaged shard
gives them) raise :class:`CorruptShardError`.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptShardError, TargetsError

MAX_BITS = 32


def bit_length(values: np.ndarray) -> np.ndarray:
    """``int64`` bit length of each non-negative value (0 for 0)."""
    v = np.asarray(values, dtype=np.uint64)
    out = np.zeros(v.shape, dtype=np.int64)
    nz = v > 0
    out[nz] = np.floor(np.log2(v[nz].astype(np.float64))).astype(np.int64) + 1
    # float64 log2 can round up just below a power of two: correct by one where needed
    too_big = nz & ((np.uint64(1) << (out.astype(np.uint64) - np.uint64(1))) > v)
    out[too_big] -= 1
    return out


def _layout(widths: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(total bits, word index, bit offset in the word, end offset)`` of each value's bit field
    in a stream of big-endian 64-bit words (values are at most 32 bits, so a field spans ≤ 2 words)."""
    widths = widths.astype(np.int64)
    if widths.size and widths.max() > MAX_BITS:
        raise TargetsError(f"bit fields hold at most {MAX_BITS} bits; found a width of {widths.max()}")
    offsets = np.cumsum(widths) - widths
    shift = offsets & 63
    return int(widths.sum()), offsets >> 6, shift, shift + widths


def _pack_variable(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate ``widths[i]`` low bits of each value, MSB first, padded to a byte.

    Works on 64-bit words, one or two per value (not one array element per bit): the part of a
    field in its first word is shifted into place, the rest (when it crosses into the next word)
    goes to that word, and each word is the sum of its disjoint parts."""
    total, word, shift, end = _layout(widths)
    if total == 0:
        return b""
    w = widths.astype(np.uint64)
    v = values.astype(np.uint64) & ((np.uint64(1) << w) - np.uint64(1))
    fits = end <= 64
    # numpy takes shift counts modulo 64, so every count below is kept in [0, 63]
    first = np.where(fits, v << ((64 - end) & 63).astype(np.uint64), v >> ((end - 64) & 63).astype(np.uint64))
    words = np.zeros((total + 63) // 64 + 1, dtype=np.uint64)
    starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    words[word[starts]] = np.add.reduceat(first, starts)
    cross = ~fits
    words[word[cross] + 1] += v[cross] << ((128 - end[cross]) & 63).astype(np.uint64)
    return words.astype(">u8").tobytes()[: (total + 7) // 8]


def _unpack_variable(data: np.ndarray, widths: np.ndarray) -> np.ndarray:
    total, word, shift, _ = _layout(widths)
    if total == 0:
        return np.zeros(widths.size, dtype=np.uint64)
    if data.size * 8 < total:
        raise CorruptShardError(f"bit stream holds {data.size * 8} bits; {total} expected")
    nbytes = (total + 7) // 8
    # two spare words: a field's next word is read even when the field ends on a word boundary, and
    # a zero-width field after the last bit sits at offset ``total``, a word past the data
    buf = np.zeros(((nbytes + 7) // 8 + 2) * 8, dtype=np.uint8)
    buf[:nbytes] = data[:nbytes]
    words = buf.view(">u8").astype(np.uint64)
    # ``x >> 1 >> (63 - n)`` is ``x >> (64 - n)`` for n in [1, 64] and 0 for n = 0, with every
    # shift count in [0, 63] (numpy takes counts modulo 64): no masks or branches per field
    window = words[word] << shift.astype(np.uint64)  # the field's first bit at the top of a 64-bit window
    window |= (words[word + 1] >> np.uint64(1)) >> (63 - shift).astype(np.uint64)
    return (window >> np.uint64(1)) >> (63 - widths.astype(np.int64)).astype(np.uint64)


def pack_fixed(values: np.ndarray, width: int) -> bytes:
    """Each value in exactly ``width`` bits; refuses values that do not fit."""
    values = np.asarray(values, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() >= (1 << width)):
        raise TargetsError(f"values in [{values.min()}, {values.max()}] do not fit in {width} bits")
    return _pack_variable(values, np.full(values.size, width, dtype=np.int64))


def unpack_fixed(data: np.ndarray, count: int, width: int) -> np.ndarray:
    data = np.asarray(data, dtype=np.uint8)
    if data.size != fixed_size(count, width):
        raise CorruptShardError(f"bit stream holds {data.size} bytes; {fixed_size(count, width)} expected")
    return _unpack_variable(np.asarray(data, dtype=np.uint8), np.full(count, width, dtype=np.int64)).astype(np.int64)


def fixed_size(count: int, width: int) -> int:
    """Bytes :func:`pack_fixed` writes for ``count`` values."""
    return (count * width + 7) // 8


def gamma_split(values: np.ndarray) -> tuple[bytes, bytes]:
    """``(symbols, mantissa bits)``: one symbol byte per value, then the packed mantissas."""
    values = np.asarray(values, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() >= (1 << MAX_BITS)):
        raise TargetsError(f"gamma code takes values in [0, 2**{MAX_BITS}); found [{values.min()}, {values.max()}]")
    symbols = bit_length(values)
    return symbols.astype(np.uint8).tobytes(), _pack_variable(values, np.maximum(symbols - 1, 0))


def unpack_gamma_split(symbols: np.ndarray, bits: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`gamma_split` for ``count`` values; refuses streams of the wrong size."""
    symbols = np.asarray(symbols, dtype=np.uint8).astype(np.int64)
    if symbols.size != count:
        raise CorruptShardError(f"gamma stream holds {symbols.size} symbols; {count} expected")
    if count and symbols.max() > MAX_BITS:
        raise CorruptShardError(f"gamma symbol {symbols.max()} exceeds {MAX_BITS}")
    widths = np.maximum(symbols - 1, 0)
    expected = (int(widths.sum()) + 7) // 8
    if np.asarray(bits).size != expected:
        raise CorruptShardError(f"gamma mantissa stream holds {np.asarray(bits).size} bytes; {expected} expected")
    mantissa = _unpack_variable(np.asarray(bits, dtype=np.uint8), widths).astype(np.int64)
    lead = np.where(symbols > 0, np.left_shift(1, widths), 0)
    return lead | mantissa
