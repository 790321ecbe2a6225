"""Compact row encodings: bit codes and row round trips against the original targets, per codec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from logitcache.errors import CorruptShardError, TargetsError
from logitcache.store.bits import bit_length, gamma_split, pack_fixed, unpack_fixed, unpack_gamma_split
from logitcache.store.encoding import Encoding, corpus_order, encode_row, q8_bound
from logitcache.store.row_decode import decode_row
from logitcache.targets import SparseTargets
from logitcache.testing.targets import assert_equal, canonical, random_row

METHODS = ["topk", "sample", "hybrid", "full"]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_gamma_round_trip(values):
    v = np.asarray(values, dtype=np.int64)
    symbols, bits = gamma_split(v)
    assert len(symbols) == v.size
    back = unpack_gamma_split(np.frombuffer(symbols, np.uint8), np.frombuffer(bits, np.uint8), v.size)
    assert back.tolist() == values


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 32), data=st.data())
def test_fixed_round_trip(width, data):
    values = data.draw(st.lists(st.integers(0, 2**width - 1), max_size=30))
    blob = pack_fixed(np.asarray(values, dtype=np.int64), width)
    assert len(blob) == (len(values) * width + 7) // 8
    assert unpack_fixed(np.frombuffer(blob, np.uint8), len(values), width).tolist() == values


@settings(max_examples=80, deadline=None)
@given(fields=st.lists(st.tuples(st.integers(0, 32), st.integers(0, 2**40)), max_size=60))
@example(fields=[(32, 5), (32, 7), (0, 0)])  # a zero-width field right after a full 64-bit word
@example(fields=[(31, 2**31 - 1), (2, 3), (31, 1), (0, 0), (0, 9)])  # crossing a word, then empty fields
def test_bit_layout_matches_a_bit_string_reference(fields):
    """The word-wise packer writes exactly the MSB-first concatenation of each value's low bits
    (the on-disk layout, docs/format.md), and reads it back."""
    from logitcache.store.bits import _pack_variable, _unpack_variable

    widths = np.asarray([w for w, _ in fields], dtype=np.int64)
    values = np.asarray([v for _, v in fields], dtype=np.uint64)
    bits = "".join(format(v & ((1 << w) - 1), f"0{w}b") if w else "" for w, v in fields)
    bits += "0" * (-len(bits) % 8)
    expected = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
    assert _pack_variable(values, widths) == expected
    back = _unpack_variable(np.frombuffer(expected, np.uint8), widths)
    assert back.tolist() == [v & ((1 << w) - 1) for w, v in fields]


def test_bit_length_matches_python_at_powers_of_two():
    x = [0] + [2**k + d for k in range(33) for d in (-1, 0, 1) if 2**k + d >= 0]
    assert bit_length(np.asarray(x, dtype=np.uint64)).tolist() == [i.bit_length() for i in x]


def test_fixed_refuses_values_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit in 17 bits"):
        pack_fixed(np.asarray([2**17]), 17)


@settings(max_examples=80, deadline=None)
@given(method=st.sampled_from(METHODS), ids=st.sampled_from(["rank-delta", "packed"]), t=st.integers(1, 19),
       vocab=st.sampled_from([7, 64, 300]), weighted=st.booleans(), seed=st.integers(0, 10**6))
def test_lossless_row_round_trip(method, ids, t, vocab, weighted, seed):
    tokens, targets = random_row(method, t, vocab, seed, weighted=weighted)
    order = corpus_order(tokens, vocab) if ids == "rank-delta" else ()
    enc = Encoding(ids=ids, logprobs="float32", vocab_size=vocab, order=order)
    row = encode_row(enc, tokens, targets)
    assert row.logprob_error == 0.0 and row.prob_error == 0.0
    back_tokens, back = decode_row(enc, method, targets.num_samples, targets.head_ids.shape[1]
                                   if targets.head_ids is not None else 0,
                                   {c: np.frombuffer(b, np.uint8) for c, b in row.columns.items()})
    assert np.array_equal(back_tokens, tokens)
    assert_equal(back, canonical(targets))


@pytest.mark.parametrize("codec", ["float16", "q8"])
@pytest.mark.parametrize("method", ["topk", "hybrid", "full"])
def test_lossy_logprobs_stay_within_the_documented_bound(codec, method):
    tokens, targets = random_row(method, 33, 200, seed=3, k=20)
    enc = Encoding(ids="packed", logprobs=codec, vocab_size=200)
    row = encode_row(enc, tokens, targets)
    k = targets.head_ids.shape[1]
    _, back = decode_row(enc, method, targets.num_samples, k, {c: np.frombuffer(b, np.uint8) for c, b in row.columns.items()})
    ref = canonical(targets)
    # compare per (position, id): decoding may reorder ties created by quantisation
    p_ref = torch.zeros(33, 200, dtype=torch.float64).scatter_(1, ref.head_ids.long(), ref.head_logprobs.double().exp())
    p_back = torch.zeros(33, 200, dtype=torch.float64).scatter_(1, back.head_ids.long(), back.head_logprobs.double().exp())
    err = (p_back - p_ref).abs()
    if codec == "q8":
        assert bool((err <= torch.from_numpy(np.asarray(q8_bound(p_ref.numpy()))) + 1e-12).all())
    else:
        lp = ref.head_logprobs.double()
        bound = torch.zeros_like(p_ref).scatter_(1, ref.head_ids.long(), lp.exp() * torch.expm1(lp.abs() * 2.0**-11))
        assert bool((err <= bound + 1e-12).all())
    assert 0 < row.prob_error == pytest.approx(float(err.max()), rel=1e-3)
    assert torch.isfinite(back.head_logprobs).all()


def test_label_trick_needs_counts_summing_to_n():
    tokens, targets = random_row("sample", 5, 30, seed=1)
    bad = SparseTargets(**{**targets.__dict__, "sample_counts": targets.sample_counts + 1})
    with pytest.raises(TargetsError, match="sum to N=50"):
        encode_row(Encoding(ids="packed", vocab_size=30), tokens, bad)


def test_ids_outside_the_vocabulary_are_refused_not_truncated():
    tokens, targets = random_row("topk", 4, 300, seed=2)
    with pytest.raises(TargetsError, match="outside the vocabulary"):
        encode_row(Encoding(ids="packed", vocab_size=200), tokens % 200, targets)


def test_wide_vocabularies_get_wider_ids():
    assert Encoding(ids="packed", vocab_size=49152).id_width == 16
    assert Encoding(ids="packed", vocab_size=131072).id_width == 17
    assert Encoding(ids="packed", vocab_size=152064).id_width == 18
    vocab = 152064
    tokens = np.asarray([5, 152063, 131072], dtype=np.int32)
    t = SparseTargets(method="topk", head_ids=torch.tensor([[152063, 131072], [7, 152062]], dtype=torch.int32),
                      head_logprobs=torch.tensor([[-0.1, -3.0], [-0.5, -1.0]]), tail_mass=torch.tensor([0.1, 0.2]))
    for ids in ("packed", "rank-delta"):
        enc = Encoding(ids=ids, vocab_size=vocab, order=(7, 5) if ids == "rank-delta" else ())
        row = encode_row(enc, tokens, t)
        _, back = decode_row(enc, "topk", 0, 2, {c: np.frombuffer(b, np.uint8) for c, b in row.columns.items()})
        assert back.head_ids.tolist() == [[152063, 131072], [7, 152062]]


def test_damaged_columns_raise_corrupt_shard_errors():
    tokens, targets = random_row("hybrid", 9, 50, seed=4)
    enc = Encoding(ids="rank-delta", vocab_size=50, order=corpus_order(tokens, 50))
    cols = {c: np.frombuffer(b, np.uint8) for c, b in encode_row(enc, tokens, targets).columns.items()}
    for name in ("head_logprobs", "tail_mass", "sample_lengths", "head_label"):
        bad = dict(cols, **{name: cols[name][:-1]})
        with pytest.raises((CorruptShardError, ValueError)):
            decode_row(enc, "hybrid", 50, 5, bad)


def test_corpus_order_is_by_count_then_id():
    assert corpus_order(np.asarray([3, 1, 3, 2, 1, 3, 0]), 6) == (3, 1, 0, 2)
