"""The compiled head decode (unit_decode_jit.head_entries) orders each position's head as decode_row's
``np.lexsort((ids, -lp))`` does, bit for bit: log-probabilities largest first, ties by id, NaN last, ``-0.0`` equal
to ``0.0``, repeated ids (a damaged row) in stored order — on the keyed path (up to HEAD_KEYED entries, ids
below 2^25) and the merge-sort path (more entries, or a larger vocabulary)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitcache.store.bits import pack_fixed
from logitcache.store.unit_decode_jit import BAD_ID, HEAD_KEYED, head_entries

# values that tie, signed zeros, infinities, NaNs of both signs, the smallest subnormal
LOGPROBS = np.array([0.0, -0.0, -1.5, -1.5, -2.0, -np.inf, np.inf, np.nan, -np.nan, -1e-45, -3.25],
                    dtype=np.float32)


def _reference(flags, labels, rest, lp):
    """decode_row's layout (label first, then the stored ids) and sort, position by position."""
    k = lp.shape[1]
    ids = np.empty(lp.shape, np.int64)
    at = 0
    for p in range(lp.shape[0]):
        f = int(flags[p])
        ids[p, :f] = labels[p]
        ids[p, f:] = rest[at:at + k - f]
        at += k - f
    order = np.lexsort((ids, -lp), axis=1)
    return np.take_along_axis(ids, order, 1).astype(np.int32), np.take_along_axis(lp, order, 1)


def _decode(flags, labels, rest, lp, vocab):
    width = max(1, int(vocab - 1).bit_length())
    bits = np.frombuffer(pack_fixed(rest, width), np.uint8)
    rest_len = lp.shape[1] - flags.astype(np.int64)
    return head_entries(False, width, np.zeros(0, np.uint8), bits, np.array([0, bits.size]),
                        np.array([0, lp.shape[0]]), rest_len, flags, labels, lp, np.zeros(0, np.int64), vocab)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(k=st.sampled_from([1, 2, 7, 64, HEAD_KEYED, HEAD_KEYED + 1, 300]),
       vocab=st.sampled_from([3, 97, 50_000, (1 << 25) + 5]), positions=st.integers(1, 6), seed=st.integers(0, 2**32))
def test_heads_sort_as_decode_rows_lexsort(k, vocab, positions, seed):
    rng = np.random.default_rng(seed)
    lp = rng.choice(LOGPROBS, (positions, k)) if rng.random() < 0.7 else \
        -rng.exponential(3, (positions, k)).astype(np.float32)
    flags = rng.random(positions) < 0.5
    labels = rng.integers(0, vocab, positions)
    # distinct ids per position where the vocabulary allows, else repeats (as only a damaged row holds)
    repeats = vocab < k or rng.random() < 0.2
    rest = np.concatenate([rng.choice(vocab, k - int(f), replace=repeats) for f in flags]).astype(np.int64)
    ids, out, status = _decode(flags, labels, rest, lp.astype(np.float32), vocab)
    want_ids, want_lp = _reference(flags, labels, rest, lp.astype(np.float32))
    assert status[0] == 0
    assert ids.dtype == np.int32 and np.array_equal(ids, want_ids)
    assert out.dtype == np.float32 and np.array_equal(out.view(np.uint32), want_lp.view(np.uint32))  # bits: -0.0, NaN


@pytest.mark.parametrize("k", [5, HEAD_KEYED + 3])
def test_an_equal_value_and_an_equal_id_keep_stored_order(k):
    """Two entries with one id and one value (a damaged row) come out as lexsort leaves them: in stored order —
    seen by the signed zeros, which compare equal and keep their bits."""
    lp = np.full((1, k), -7.0, np.float32)
    lp[0, 1], lp[0, 3] = -0.0, 0.0
    rest = np.arange(k, dtype=np.int64) + 10
    rest[3] = rest[1]
    ids, out, _ = _decode(np.zeros(1, bool), np.zeros(1, np.int64), rest, lp, 1000)
    assert ids[0, 0] == ids[0, 1] == 11
    assert np.signbit(out[0, 0]) and not np.signbit(out[0, 1])


def test_an_id_outside_the_vocabulary_is_returned_as_damage():
    lp = np.zeros((2, 3), np.float32)
    rest = np.array([1, 2, 3, 4, 5, 6])
    _, _, status = _decode(np.zeros(2, bool), np.zeros(2, np.int64), rest, lp, 6)  # 6 is past V = 6
    assert status.tolist() == [BAD_ID, 0, 6, 6]
