"""The sampled entries and the heads of a unit decoded by compiled passes (numba, :mod:`logitcache.store.jit`): what
:func:`logitcache.store.unit_decode` gives for a unit's ``sample_*`` and ``head_*`` columns, one loop over its rows.

Row by row, :func:`sample_entries` checks that the row's id stream holds the bits its entries need (one pass
over its gamma symbols), then reads each field from the two big-endian 64-bit words it starts in (no bit buffer,
no branch per byte: the field's bit offset is the only value carried from entry to entry; rank-delta: gamma
symbols and mantissas, gaps → ranks → ids; packed: ``id_width``-bit ids), lays each position's entries out label
first (its count the position's ``N`` minus the others'), then sorts them by id, stable as ``decode_row``'s
argsort: up to RANK_MAX entries by counting each entry's rank among them (branch-free compares of ``id · 2^16 +
place`` keys, so a repeated id keeps its stored order), more through a two-level bitmap of the vocabulary (set each
id's bit, read the set bits back in order; a position whose ids repeat, which only a damaged row gives, goes to an
insertion sort). A position's ranks ascend, so one check of its last rank (or largest packed id) against the vocabulary
covers all of them (a rank past it is read as the last id until then).
:func:`head_entries` does the same for a unit's heads (``head_*`` columns): the ids as above, the label first, then
each position's ``k`` entries sorted by a ``(log-probability descending, id)`` key, NaN last as numpy sorts it.
Damage is returned, not raised (numba code cannot build the message): ``status`` holds a ``BAD_*`` code,
the row and two numbers for the message, which :mod:`logitcache.store.unit_decode` raises.
"""

from __future__ import annotations

import numpy as np

from .bits import MAX_BITS
from .jit import bind_on_first_use, njit_on_first_use
from .rans import scratch

bind_on_first_use(__name__, "trailing_zeros", "numba.cpython.unsafe.numbers")  # llvm.cttz, numba's intrinsic

__all__ = ["BAD_COUNT", "BAD_GAMMA", "BAD_ID", "BAD_RANK", "BAD_SIZE", "head_entries", "sample_entries"]

# status codes of sample_entries (status[0]; 0: none); status[1] is the row, status[2:4] what the message needs
BAD_GAMMA, BAD_SIZE, BAD_RANK, BAD_ID, BAD_COUNT = 1, 2, 3, 4, 5
RANK_MAX = 32  # positions of at most this many entries are sorted by rank counts, larger ones by the bitmap
SCRATCH_KEYS = 1 << 21  # head keys up to this many (16 MiB) go to this thread's reused buffer
HEAD_KEYED = 128  # heads of at most this many entries (7 bits of a key) are sorted by distinct keys, larger merged
trailing_zeros = None  # the index of the lowest set bit: numba's intrinsic, bound when the kernels compile


def sample_entries(rank_delta: bool, id_width: int, symbols: np.ndarray, bits: np.ndarray, bits_off: np.ndarray,
                   pos_off: np.ndarray, rest_len: np.ndarray, flags: np.ndarray, labels: np.ndarray,
                   stored_counts: np.ndarray, num_samples: int, unrank: np.ndarray,
                   vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids int32[E], counts int32[E], source int32[E], status int64[4])``: each position's entries sorted by
    id (positions end to end), their counts, and where each stood in the label-first stored order (what
    ``sample_weights`` is stored in). ``symbols``: the gamma symbols (rank-delta; else empty); ``bits``,
    ``bits_off``: the id bit stream and each row's byte offsets in it; ``stored_counts``: ``count - 1`` of the
    entries after the label."""
    total = int(rest_len.sum()) + int(flags.sum())
    ids, counts, source = np.empty(total, np.int32), np.empty(total, np.int32), np.empty(total, np.int32)
    status = np.zeros(4, np.int64)
    bitmap = np.zeros((vocab + 63) // 64, np.int64)
    buffers = (bitmap, np.zeros((bitmap.size + 63) // 64, np.int64), np.empty(vocab, np.int64),
               np.empty(RANK_MAX, np.int64), np.empty(RANK_MAX, np.int64))
    _decode_rows(rank_delta, id_width, symbols, _words(bits), _i64(bits_off), _i64(pos_off), _i64(rest_len),
                 flags.view(np.uint8), _i64(labels), stored_counts, num_samples, _i64(unrank), vocab, ids, counts,
                 source, status, *buffers)
    return ids, counts, source, status


def _i64(values: np.ndarray) -> np.ndarray:
    """``values`` as int64, not copied where they already are (``unrank`` is vocabulary-sized: 49152 ids, 384 KiB)."""
    return values.astype(np.int64, copy=False)


def _words(bits: np.ndarray) -> np.ndarray:
    """The id bit stream as big-endian 64-bit words, with a word past the last field's first word."""
    padded = np.zeros(bits.size // 8 * 8 + 16, np.uint8)
    padded[:bits.size] = bits
    return padded.view(">u8").astype(np.uint64)


@njit_on_first_use
def _decode_rows(rank_delta, id_width, symbols, words, bits_off, pos_off, rest_len, flags, labels, stored_counts,
                 num_samples, unrank, vocab, ids, counts, source, status, bitmap, summary, slot, keys, held):
    """Every row into ``ids``/``counts``/``source``; stops at the first damaged row (``status``)."""
    e, out = 0, 0  # the next stored entry (after labels), the next output entry
    for r in range(pos_off.size - 1):
        p0, p1 = pos_off[r], pos_off[r + 1]
        q = _row_start(rank_delta, id_width, symbols, bits_off, rest_len, p0, p1, e, r, status)  # the next field's bit
        if q < 0:
            return
        for p in range(p0, p1):
            o0, o = out, out + flags[p]
            n = rest_len[p]
            q = _position_ids(rank_delta, id_width, symbols, words, unrank, vocab, e, n, q, ids, o, r, status)
            if q < 0:
                return
            left = num_samples
            for j in range(n):
                c = np.int64(stored_counts[e + j]) + 1
                counts[o + j], source[o + j] = c, o + j
                left -= c
            if flags[p]:
                if left < 1:
                    _fail(status, BAD_COUNT, r, left, 1)
                    return
                ids[o0], counts[o0], source[o0] = labels[p], left, o0
            e, out = e + n, o + n
            _sort_position(ids, counts, source, o0, out, bitmap, summary, slot, keys, held)


def head_entries(rank_delta: bool, id_width: int, symbols: np.ndarray, bits: np.ndarray, bits_off: np.ndarray,
                 pos_off: np.ndarray, rest_len: np.ndarray, flags: np.ndarray, labels: np.ndarray, lp: np.ndarray,
                 unrank: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids int32[P, k], logprobs float32[P, k], status int64[4])``: each position's head (its label first where
    flagged, then its ``rest_len`` stored ids) sorted by log-probability, largest first, ties by id — ``decode_row``'s
    ``lexsort((ids, -lp))``, NaN last and ``-0.0`` equal to ``0.0``, stable. ``lp``: float32 ``[P, k]`` in stored
    order; the other arguments as :func:`sample_entries`'.

    Each entry gets a 64-bit key, :func:`_descending` of its log-probability above its id; up to HEAD_KEYED
    entries of ids below 2^25 the id sits above the entry's column (7 bits), so keys are distinct and numpy's
    (vectorised) sort of the ``[P, k]`` keys orders every head at once; else each head is merge-sorted (stable)."""
    count, k = lp.shape
    ids, out_lp, status = np.empty((count, k), np.int32), np.empty((count, k), np.float32), np.zeros(4, np.int64)
    lp32 = np.ascontiguousarray(lp, dtype=np.float32)
    keyed = k <= HEAD_KEYED and vocab <= 1 << 25
    keys = (scratch("head_keys", count * k, np.uint64) if count * k <= SCRATCH_KEYS  # reused: no fresh pages
            else np.empty(count * k, np.uint64)).reshape(count, k)
    _head_keys(rank_delta, id_width, symbols, _words(bits), _i64(bits_off), _i64(pos_off), _i64(rest_len),
               flags.view(np.uint8), _i64(labels), lp32.view(np.uint32), _i64(unrank), vocab, keyed, keys, status,
               np.empty(k, np.int64))
    if not status[0]:
        if keyed:
            keys.sort(axis=1)
        _unkey(keys, lp32, keyed, ids, out_lp)
    return ids, out_lp, status


@njit_on_first_use
def _head_keys(rank_delta, id_width, symbols, words, bits_off, pos_off, rest_len, flags, labels, lp_bits, unrank,
               vocab, keyed, keys, status, row_ids):
    """Every head's keys in stored order (``keyed``: ``descending lp << 32 | id << 7 | column``; else
    ``descending lp << 32 | id``); stops at the first damaged row (``status``)."""
    e, k = 0, lp_bits.shape[1]
    shift = np.uint64(7 if keyed else 0)
    for r in range(pos_off.size - 1):
        p0, p1 = pos_off[r], pos_off[r + 1]
        q = _row_start(rank_delta, id_width, symbols, bits_off, rest_len, p0, p1, e, r, status)
        if q < 0:
            return
        for p in range(p0, p1):
            f, n = np.int64(flags[p]), rest_len[p]  # n + f == k
            if f:
                row_ids[0] = labels[p]
            q = _position_ids(rank_delta, id_width, symbols, words, unrank, vocab, e, n, q, row_ids, f, r, status)
            if q < 0:
                return
            e += n
            for j in range(k):
                keys[p, j] = (np.uint64(_descending(lp_bits[p, j])) << np.uint64(32)) | \
                    (np.uint64(row_ids[j]) << shift) | np.uint64(j if keyed else 0)


@njit_on_first_use
def _unkey(keys, lp, keyed, ids, out_lp):
    """Sorted keys (``keyed``; else stored-order keys, merge-sorted here per head) → ids and their log-probabilities."""
    k = keys.shape[1]
    for p in range(keys.shape[0]):
        if keyed:
            for j in range(k):
                key = keys[p, j]
                ids[p, j], out_lp[p, j] = np.int32((key & np.uint64(0xFFFFFFFF)) >> np.uint64(7)), lp[p, key & 127]
        else:
            order = np.argsort(keys[p], kind="mergesort")
            for j in range(k):
                ids[p, j], out_lp[p, j] = np.int32(keys[p, order[j]] & np.uint64(0xFFFFFFFF)), lp[p, order[j]]


@njit_on_first_use
def _descending(b):
    """A key of the float32 with bits ``b`` that ascends as the value descends: ``-0.0`` as ``0.0``, NaN last."""
    b = np.uint32(b)
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN
        return np.uint32(0xFFFFFFFF)
    if (b & np.uint32(0x7FFFFFFF)) == 0:  # -0.0
        b = np.uint32(0)
    ascending = b ^ np.uint32(0x80000000) if b < np.uint32(0x80000000) else ~b
    return ~ascending


@njit_on_first_use
def _row_start(rank_delta, id_width, symbols, bits_off, rest_len, p0, p1, e, r, status):
    """The first bit of row ``r``'s id stream (positions ``p0:p1``, its stored entries from ``e``), or -1 where the
    stream does not hold what they need (``status`` set)."""
    e1 = e
    for p in range(p0, p1):
        e1 += rest_len[p]
    return bits_off[r] * 8 if _row_fits(rank_delta, id_width, symbols, bits_off, e, e1, r, status) else -1


@njit_on_first_use
def _position_ids(rank_delta, id_width, symbols, words, unrank, vocab, e, n, q, ids, o, r, status):
    """A position's ``n`` stored ids (entries from ``e``, bits from ``q``) into ``ids[o:o + n]``: the next bit, or -1
    where a rank or id is past the vocabulary (``status`` set, naming row ``r``)."""
    if rank_delta:
        q, top = _gamma_ids(symbols, words, unrank, vocab, e, n, q, ids, o)
    else:
        q, top = _packed_ids(words, id_width, n, q, ids, o)
    if top >= vocab:
        _fail(status, BAD_RANK if rank_delta else BAD_ID, r, top, vocab)
        return -1
    return q


@njit_on_first_use
def _row_fits(rank_delta, id_width, symbols, bits_off, e0, e1, r, status):
    """Whether row ``r``'s id stream holds the bytes its entries ``e0:e1`` need, its gamma symbols at most
    MAX_BITS (else ``status``); a branch-free loop over the symbols."""
    need = (e1 - e0) * id_width
    if rank_delta:
        need, top = 0, 0
        for e in range(e0, e1):
            s = np.int64(symbols[e])
            need += max(s - 1, 0)
            top = max(top, s)
        if top > MAX_BITS:
            _fail(status, BAD_GAMMA, r, top, MAX_BITS)
            return False
    size = bits_off[r + 1] - bits_off[r]
    if size != (need + 7) // 8:
        _fail(status, BAD_SIZE, r, size, (need + 7) // 8)
        return False
    return True


@njit_on_first_use
def _field(words, q, w):
    """The ``w`` bits (0 to 32) at bit ``q`` of the stream held as big-endian ``words``: the 64 bits from ``q``
    on (a word and the next), then their top ``w`` (two shifts each, so that 0 bits shift by 64 nowhere)."""
    i, off = q >> 6, np.uint64(q & 63)
    hi = (words[i] << off) | ((words[i + 1] >> np.uint64(1)) >> (np.uint64(63) - off))
    return np.int64((hi >> np.uint64(1)) >> np.uint64(63 - w))


@njit_on_first_use
def _gamma_ids(symbols, words, unrank, vocab, e, n, q, ids, o):
    """A position's ``n`` rank-delta ids (symbols from ``e``, mantissas from bit ``q``) into ``ids[o:o + n]``:
    ``(the next bit, its last rank)``; a rank past the vocabulary is read as the last id (the caller refuses it)."""
    rank = np.int64(0)
    for j in range(n):
        s = np.int64(symbols[e + j])
        w = max(s - 1, 0)
        rank += (min(s, 1) << w) | _field(words, q, w)
        q += w
        ids[o + j] = unrank[min(rank, vocab - 1)]
    return q, rank


@njit_on_first_use
def _packed_ids(words, id_width, n, q, ids, o):
    """A position's ``n`` packed ids (from bit ``q``) into ``ids[o:o + n]``: ``(the next bit, the largest id)``."""
    top = np.int64(0)
    for j in range(n):
        v = _field(words, q, id_width)
        q += id_width
        top = max(top, v)
        ids[o + j] = v
    return q, top


@njit_on_first_use
def _fail(status, code, row, found, expected):
    status[0], status[1], status[2], status[3] = code, row, found, expected


@njit_on_first_use
def _sort_position(ids, counts, source, o0, o1, bitmap, summary, slot, keys, held):
    """``o0:o1`` sorted by id, ties in place (stable)."""
    if o1 - o0 <= RANK_MAX:
        _rank_sort(ids, counts, source, o0, o1, keys, held)
    elif not _bitmap_sort(ids, counts, source, o0, o1, bitmap, summary, slot):
        _insertion_sort(ids, counts, source, o0, o1)


@njit_on_first_use
def _rank_sort(ids, counts, source, o0, o1, keys, held):
    """``o0:o1`` (at most RANK_MAX entries) sorted by id: each entry goes to the number of keys below its own
    (``id · 2^16 + place``: distinct, so ties keep their place); ``keys``/``held`` hold the entries meanwhile."""
    n = o1 - o0
    for i in range(n):
        keys[i] = (np.int64(ids[o0 + i]) << 16) | i
        held[i] = (np.int64(counts[o0 + i]) << 32) | source[o0 + i]
    for i in range(n):
        k, below = keys[i], 0
        for j in range(n):
            below += keys[j] < k
        h = held[i]
        ids[o0 + below], counts[o0 + below], source[o0 + below] = k >> 16, h >> 32, h & 0xFFFFFFFF


@njit_on_first_use
def _insertion_sort(ids, counts, source, o0, o1):
    for i in range(o0 + 1, o1):
        key, c, s = ids[i], counts[i], source[i]
        j = i - 1
        while j >= o0 and ids[j] > key:
            ids[j + 1], counts[j + 1], source[j + 1] = ids[j], counts[j], source[j]
            j -= 1
        ids[j + 1], counts[j + 1], source[j + 1] = key, c, s


@njit_on_first_use
def _bitmap_sort(ids, counts, source, o0, o1, bitmap, summary, slot):
    """Sort distinct ids by their bits in ``bitmap`` (``summary``: which of its words are set; ``slot``: each
    id's count and place, ``count << 32 | place``); False (bitmap left clear, entries untouched) when an id
    repeats."""
    lo, hi = summary.size, -1
    for i in range(o0, o1):
        v = np.int64(ids[i])
        w = v >> 6
        bit = np.int64(1) << (v & 63)
        if bitmap[w] & bit:
            for j in range(o0, i):
                bitmap[ids[j] >> 6], summary[ids[j] >> 12] = 0, 0
            return False
        bitmap[w] |= bit
        summary[w >> 6] |= np.int64(1) << (w & 63)
        slot[v] = (np.int64(counts[i]) << 32) | (i - o0)
        lo, hi = min(lo, w >> 6), max(hi, w >> 6)
    o = o0
    for sw in range(lo, hi + 1):
        s = summary[sw]
        summary[sw] = 0
        while s:
            w = sw * 64 + trailing_zeros(s)
            s &= s - 1
            x = bitmap[w]
            bitmap[w] = 0
            while x:
                v = w * 64 + trailing_zeros(x)
                x &= x - 1
                k = slot[v]
                ids[o], counts[o], source[o] = v, k >> 32, o0 + (k & 0xFFFFFFFF)
                o += 1
    return True

