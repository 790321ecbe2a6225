"""The sampled entries of a unit decoded by one compiled pass (numba, :mod:`logitcache.store.jit`): what
:func:`logitcache.store.unit_decode` gives for a unit's ``sample_*`` columns, in one loop over its rows.

Row by row, :func:`sample_entries` reads the row's id stream (rank-delta: gamma symbols and mantissas, gaps →
ranks → ids; packed: ``id_width``-bit ids) with a bit buffer, lays each position's entries out label first
(its count the position's ``N`` minus the others'), then sorts them by id, stable as ``decode_row``'s argsort:
an insertion sort for a few entries, else a two-level bitmap of the vocabulary (set each id's bit, read the set
bits back in order; a position whose ids repeat, which only a damaged row gives, goes to the insertion sort).
Damage is returned, not raised (numba code cannot build the message): ``status`` holds an ``ERRORS`` code,
the row and two numbers for the message, which :mod:`logitcache.store.unit_decode` raises.
"""

from __future__ import annotations

import numpy as np

from .bits import MAX_BITS
from .jit import njit_on_first_use

__all__ = ["ERRORS", "sample_entries"]

# status codes of sample_entries (status[0]); status[1] is the row, status[2:4] what the message needs
ERRORS = {1: "gamma_symbol", 2: "bits_size", 3: "rank", 4: "id", 5: "count"}
INSERTION_MAX = 16  # positions of at most this many entries are insertion-sorted, larger ones by the bitmap
_DE_BRUIJN = 0x03F79D71B4CB0A89
_DE_BRUIJN_INDEX = np.zeros(64, np.int64)
_DE_BRUIJN_INDEX[((_DE_BRUIJN << np.arange(64, dtype=np.uint64)) >> np.uint64(58)).astype(np.int64)] = np.arange(64)


def sample_entries(rank_delta: bool, id_width: int, symbols: np.ndarray, bits: np.ndarray, bits_off: np.ndarray,
                   pos_off: np.ndarray, rest_len: np.ndarray, flags: np.ndarray, labels: np.ndarray,
                   stored_counts: np.ndarray, num_samples: int, unrank: np.ndarray,
                   vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids int32[E], counts int32[E], source int64[E], status int64[4])``: each position's entries sorted by
    id (positions end to end), their counts, and where each stood in the label-first stored order (what
    ``sample_weights`` is stored in). ``symbols``: the gamma symbols (rank-delta; else empty); ``bits``,
    ``bits_off``: the id bit stream and each row's byte offsets in it; ``stored_counts``: ``count - 1`` of the
    entries after the label."""
    total = int(rest_len.sum()) + int(flags.sum())
    ids, counts = np.empty(total, np.int32), np.empty(total, np.int32)
    source, status = np.empty(total, np.int64), np.zeros(4, np.int64)
    words = np.zeros((vocab + 63) // 64, np.int64)
    scratch = (words, np.zeros((words.size + 63) // 64, np.int64), np.empty(vocab, np.int64), np.empty(vocab, np.int32))
    _decode_rows(rank_delta, id_width, symbols, bits, bits_off.astype(np.int64), pos_off.astype(np.int64),
                 rest_len.astype(np.int64), flags.view(np.uint8), labels.astype(np.int64), stored_counts,
                 num_samples, unrank.astype(np.int64), vocab, ids, counts, source, status, *scratch)
    return ids, counts, source, status


@njit_on_first_use
def _decode_rows(rank_delta, id_width, symbols, bits, bits_off, pos_off, rest_len, flags, labels, stored_counts,
                 num_samples, unrank, vocab, ids, counts, source, status, words, summary, slot, held):
    """Every row into ``ids``/``counts``/``source``; stops at the first damaged row (``status``)."""
    e, out = 0, 0  # the next stored entry (after labels), the next output entry
    for r in range(pos_off.size - 1):
        p0, p1 = pos_off[r], pos_off[r + 1]
        e1 = e
        for p in range(p0, p1):
            e1 += rest_len[p]
        need = _row_bits(rank_delta, id_width, symbols, e, e1, r, status)
        if status[0]:
            return
        b0, b1 = bits_off[r], bits_off[r + 1]
        if b1 - b0 != (need + 7) // 8:
            _fail(status, 2, r, b1 - b0, (need + 7) // 8)
            return
        acc, have, at = 0, 0, b0  # the bit buffer: `have` bits of `acc`, next byte `at`
        for p in range(p0, p1):
            o, rank, left = out, 0, num_samples
            if flags[p]:
                ids[o], source[o] = labels[p], o
                o += 1
            for _ in range(rest_len[p]):
                while have <= 55:
                    acc = (acc << 8) | (bits[at] if at < b1 else 0)
                    at, have = at + 1, have + 8
                if rank_delta:
                    s = np.int64(symbols[e])
                    w = max(s - 1, 0)
                    have -= w
                    rank += (min(s, 1) << w) | ((acc >> have) & ((1 << w) - 1))  # gap: lead bit (none for 0), mantissa
                    if rank >= vocab:
                        _fail(status, 3, r, rank, vocab)
                        return
                    ids[o] = unrank[rank]
                else:
                    have -= id_width
                    v = (acc >> have) & ((1 << id_width) - 1)
                    if v >= vocab:
                        _fail(status, 4, r, v, vocab)
                        return
                    ids[o] = v
                acc &= (1 << have) - 1
                counts[o], source[o] = stored_counts[e] + 1, o
                left -= stored_counts[e] + 1
                e, o = e + 1, o + 1
            if flags[p]:
                if left < 1:
                    _fail(status, 5, r, left, 1)
                    return
                counts[out] = left
            _sort_position(ids, counts, source, out, o, words, summary, slot, held)
            out = o


@njit_on_first_use
def _row_bits(rank_delta, id_width, symbols, e0, e1, r, status):
    """Bits the row's id stream holds for its entries ``e0:e1`` (a gamma symbol above MAX_BITS: ``status``)."""
    if not rank_delta:
        return (e1 - e0) * id_width
    need = 0
    for e in range(e0, e1):
        s = symbols[e]
        if s > MAX_BITS:
            _fail(status, 1, r, s, MAX_BITS)
            return 0
        need += s - 1 if s > 1 else 0
    return need


@njit_on_first_use
def _fail(status, code, row, found, expected):
    status[0], status[1], status[2], status[3] = code, row, found, expected


@njit_on_first_use
def _sort_position(ids, counts, source, o0, o1, words, summary, slot, held):
    """``o0:o1`` sorted by id, ties in place (stable)."""
    if o1 - o0 <= INSERTION_MAX or not _bitmap_sort(ids, counts, source, o0, o1, words, summary, slot, held):
        _insertion_sort(ids, counts, source, o0, o1)


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
def _bitmap_sort(ids, counts, source, o0, o1, words, summary, slot, held):
    """Sort distinct ids by their bits in ``words`` (``summary``: which words are set; ``slot``, ``held``: each
    id's entry and count); False (bitmap left clear, entries untouched) when an id repeats."""
    lo, hi = summary.size, -1
    for i in range(o0, o1):
        v = ids[i]
        w = v >> 6
        bit = np.int64(1) << (v & 63)
        if words[w] & bit:
            for j in range(o0, i):
                words[ids[j] >> 6], summary[ids[j] >> 12] = 0, 0
            return False
        words[w] |= bit
        summary[w >> 6] |= np.int64(1) << (w & 63)
        slot[v], held[v] = i, counts[i]
        lo, hi = min(lo, w >> 6), max(hi, w >> 6)
    o = o0
    for sw in range(lo, hi + 1):
        s = summary[sw]
        summary[sw] = 0
        while s:
            w = sw * 64 + _trailing_zeros(s)
            s &= s - 1
            x = words[w]
            words[w] = 0
            while x:
                v = w * 64 + _trailing_zeros(x)
                x &= x - 1
                ids[o], counts[o], source[o] = v, held[v], slot[v]
                o += 1
    return True


@njit_on_first_use
def _trailing_zeros(x):
    """The index of the lowest set bit of ``x`` (not 0): its isolated bit times a de Bruijn sequence, top 6 bits."""
    return _DE_BRUIJN_INDEX[(((x & -x) * _DE_BRUIJN) >> 58) & 63]
