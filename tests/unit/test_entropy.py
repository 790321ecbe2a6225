"""The ans entropy stage: rANS against the static entropy it should reach, and unit round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.errors import ConfigError, CorruptShardError
from logitcache.store import rans
from logitcache.store.encoding import Encoding, encode_row
from logitcache.store.row_decode import decode_row
from logitcache.store.entropy import COLUMN, coded_columns, pack_unit, unpack_unit
from logitcache.store.spec import ShardSpec
from logitcache.store.units import from_blobs
from logitcache.testing.targets import random_row
from helpers import random_stream




@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), lanes=st.integers(1, 300),
       shapes=st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 300), st.integers(1, 6),
                                 st.sampled_from([0.05, 0.5, 5.0])), min_size=1, max_size=3))
def test_rans_round_trip(seed, lanes, shapes):
    rng = np.random.default_rng(seed)
    streams = []
    for n, alphabet, contexts, skew in shapes:
        sym, ctx = random_stream(rng, n, alphabet, contexts, skew)
        streams.append((sym, ctx, rans.Tables.fit(sym, ctx, contexts, alphabet)))
    states, words = rans.encode(streams, lanes)
    tables = rans.unpack_tables(rans.pack_tables([t for _, _, t in streams]))
    decoder = rans.Decoder(states, words)
    for (sym, ctx, _), t in zip(streams, tables):
        assert np.array_equal(decoder.decode(ctx, t), sym)
    decoder.finish()


def test_rans_reaches_the_conditional_entropy_where_zstd_cannot():
    """A skewed symbol (p(0) = 0.9 in one context) costs ~0.47 bits: rANS pays that plus its
    tables and lane flush; a Huffman stage pays at least 1 bit per symbol."""
    import zlib

    rng = np.random.default_rng(0)
    n = 200_000
    ctx = rng.integers(0, 2, n)
    sym = np.where(ctx == 0, (rng.random(n) > 0.9).astype(np.int64), rng.integers(0, 8, n))
    _, counts = np.unique(ctx * 8 + sym, return_counts=True)
    _, ctx_counts = np.unique(ctx, return_counts=True)
    entropy_bytes = (-(counts * np.log2(counts)).sum() + (ctx_counts * np.log2(ctx_counts)).sum()) / 8
    tables = rans.Tables.fit(sym, ctx, 2, 8)
    states, words = rans.encode([(sym, ctx, tables)], 64)
    coded = words.size * 2 + states.size * 4 + len(rans.pack_tables([tables]))
    assert coded <= entropy_bytes * 1.005 + 64 * 4 + 100, (coded, entropy_bytes)
    assert coded < 0.8 * len(zlib.compress(sym.astype(np.uint8).tobytes(), 9))


def test_normalize_gives_every_used_cell_a_frequency_and_sums_to_m():
    rng = np.random.default_rng(1)
    table = rng.integers(0, 256, (50, 300)).astype(np.uint8)
    table[3] = 0  # an unused context
    table[4] = 0
    table[4, 7] = 200  # a context with one symbol
    freq = rans.normalize(table)
    used = table.sum(1) > 0
    assert np.all(freq[used].sum(1) == rans.M) and np.all(freq[~used] == 0)
    assert np.all((freq > 0) == (table > 0))
    assert freq[4, 7] == rans.M
    with pytest.raises(ValueError, match="more than"):
        rans.normalize(np.ones((1, rans.M + 1), np.uint8))


def _spec(method, ids, logprobs, k=5, n=50, weighted=False):
    enc = Encoding(ids=ids, logprobs=logprobs, vocab_size=300, order=tuple(range(300)) if ids == "rank-delta" else (),
                   entropy="ans")
    return ShardSpec(method=method, encoding=enc, k=k if method != "sample" else 0,
                     num_samples=n if method in ("sample", "hybrid") else 0, weighted=weighted)


def _unit(spec, rows):
    columns = [encode_row(spec.encoding, tok, t).columns for tok, t in rows]
    packed = pack_unit(spec, columns)
    return columns, packed, from_blobs(np.arange(len(rows), dtype=np.uint64),
                                       {name: [r[name] for r in packed] for name in spec.columns()})


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(["topk", "sample", "hybrid", "full"]), ids=st.sampled_from(["rank-delta", "packed"]),
       logprobs=st.sampled_from(["float32", "float16", "q8"]), sequences=st.integers(1, 4), t=st.integers(1, 12),
       weighted=st.booleans(), seed=st.integers(0, 10**6))
def test_unit_round_trip_restores_every_row_column(method, ids, logprobs, sequences, t, weighted, seed):
    weighted = weighted and method == "sample"
    vocab = 300 if method != "full" else 40
    rows = [random_row(method, t, vocab, seed + i, k=5, weighted=weighted) for i in range(sequences)]
    spec = _spec(method, ids, logprobs, k=rows[0][1].head_ids.shape[1] if method != "sample" else 0,
                 weighted=weighted)
    if method == "full":
        spec = ShardSpec(method=method, encoding=Encoding(ids=ids, logprobs=logprobs, vocab_size=vocab,
                         order=tuple(range(vocab)) if ids == "rank-delta" else (), entropy="ans"), k=vocab)
    columns, packed, unit = _unit(spec, rows)
    assert set(packed[0]) == set(spec.columns()) and all(not r[COLUMN] for r in packed[1:])
    assert not set(coded_columns(spec)) & set(packed[0])
    back = unpack_unit(spec, unit)
    for r, original in enumerate(columns):
        assert {name: bytes(v) for name, v in back.row(r).items()} == original


@pytest.mark.parametrize("logprobs", ["float32", "q8"])
def test_units_where_every_entry_is_the_label_round_trip(logprobs):
    """No gap lengths at all (every draw, every top-1 is the label): streams with no symbols."""
    import torch

    from logitcache.targets import SparseTargets

    tokens = np.array([3, 5, 7, 5, 9], dtype=np.int32)
    labels = torch.from_numpy(tokens[1:].astype(np.int64))
    t = labels.numel()
    rows = [(tokens, SparseTargets(method="hybrid", num_samples=50, head_ids=labels[:, None].int(),
                                   head_logprobs=torch.full((t, 1), -0.5), tail_mass=torch.full((t,), 0.39),
                                   sample_lengths=torch.ones(t, dtype=torch.int32), sample_ids=labels.int(),
                                   sample_counts=torch.full((t,), 50, dtype=torch.int32)))]
    spec = _spec("hybrid", "rank-delta", logprobs, k=1)
    columns, _, unit = _unit(spec, rows)
    back = unpack_unit(spec, unit)
    assert {name: bytes(v) for name, v in back.row(0).items()} == columns[0]
    _, decoded = decode_row(spec.encoding, "hybrid", 50, 1, back.row(0))  # the zstd path reads these columns
    assert torch.equal(decoded.sample_ids.long(), labels) and torch.equal(decoded.head_ids[:, 0].long(), labels)


def test_damaged_entropy_columns_are_refused_clearly():
    rows = [random_row("hybrid", 40, 300, seed) for seed in range(3)]
    spec = _spec("hybrid", "rank-delta", "q8")
    _, packed, _ = _unit(spec, rows)
    blob = packed[0][COLUMN]
    rng = np.random.default_rng(0)
    damaged = [blob[:-2], blob + b"\0\0", blob[:5], b"", blob[:8] + b"\x00" * (len(blob) - 8)]
    for _ in range(40):
        b = bytearray(blob)
        b[int(rng.integers(8, len(b)))] ^= 1 << int(rng.integers(0, 8))
        damaged.append(bytes(b))
    refused = []
    for bad in damaged:
        unit = from_blobs(np.arange(3, dtype=np.uint64),
                          {name: [bad if name == COLUMN and i == 0 else r[name] for i, r in enumerate(packed)]
                           for name in spec.columns()})
        try:
            unpack_unit(spec, unit)
            refused.append(False)
        except CorruptShardError:
            refused.append(True)
    # structural damage is always refused; a flipped bit could in principle survive as another
    # well-formed unit (the container's sha256 catches those), but anything else must be a
    # CorruptShardError, never another exception (45 of 45 refused when written)
    assert all(refused[:5]) and sum(refused[5:]) >= 36


def test_too_many_draws_for_the_ans_tables_is_a_config_error():
    with pytest.raises(ConfigError, match="4095"):
        pack_unit(_spec("sample", "rank-delta", "float32", n=5000), [])


@pytest.mark.parametrize("largest", [255, 256, 255 + 255])
def test_q8_codes_past_255_are_refused(monkeypatch, largest):
    """A well-formed stream can still decode a position's smallest code plus a difference above 255
    (a damaged or forged unit): refused, not wrapped around into another code; a largest code of
    exactly 255 is a code like any other."""
    from logitcache.store import entropy

    rows = [random_row("topk", 30, 300, seed, k=5) for seed in range(2)]
    spec = _spec("topk", "rank-delta", "q8")
    true_values = entropy._row_values

    def shifted(*args):  # each position's smallest code set so its largest code is ``largest`` (at most)
        values = true_values(*args)
        spread = values["head_logprobs"].reshape(-1, spec.k).max(axis=1)
        values["head_qmin"] = np.clip(largest - spread, 0, 255)
        return values

    monkeypatch.setattr(entropy, "_row_values", shifted)
    _, _, unit = _unit(spec, rows)
    monkeypatch.undo()
    if largest <= 255:
        codes = unpack_unit(spec, unit).columns["head_logprobs"][0]
        assert codes.max() == 255
        return
    with pytest.raises(CorruptShardError, match="head_logprobs codes above 255"):
        unpack_unit(spec, unit)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int64])
def test_contexts_outside_the_tables_are_refused_by_the_vector_step(dtype):
    """The vector decode step maps contexts to table rows itself: a negative context (also a narrow
    signed one) or one past the tables is refused, never read as another row."""
    sym, ctx = np.zeros(40, np.int64), np.zeros(40, np.int64)
    tables = rans.Tables.fit(sym, ctx, 3, 1)
    states, words = rans.encode([(sym, ctx, tables)], 16)
    for bad in (-1, 3):
        if bad < 0 and not np.issubdtype(dtype, np.signedinteger):
            continue
        contexts = np.zeros(40, dtype)
        contexts[37] = bad
        with pytest.raises(CorruptShardError, match="context outside its tables"):
            rans.Decoder(states, words).decode(contexts, tables)
    with pytest.raises(CorruptShardError, match="context with an empty table"):
        rans.Decoder(states, words).decode(np.full(40, 2, dtype), tables)
