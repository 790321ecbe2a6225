"""The compiled (numba) entropy stage writes and reads the same bytes as the numpy one it replaced.

The reference below is the numpy implementation as it was before the coder loops were compiled
(commit a5d9d70: ``rans.encode``, ``rans.Decoder.decode``, the rounding loop of ``rans.normalize``
and the wave contexts of ``entropy._streams``), kept here verbatim in substance. Every check
compares it with the library on the same input: identical states, words, tables and unit bytes;
each side decodes what the other wrote.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.capture import capture
from logitcache.errors import CorruptShardError
from logitcache.store import read_manifest, rans
from logitcache.store import entropy as ent
from logitcache.store import waves
from logitcache.store.bits import bit_length
from logitcache.store.containers import get_container
from logitcache.store.encoding import Encoding, encode_row
from logitcache.store.fs import StoreFS
from logitcache.store.spec import ShardSpec, spec_from_manifest
from logitcache.testing.targets import random_row

from helpers import make_config, random_stream

M, PRECISION, LOW = rans.M, rans.PRECISION, rans.LOW


# ---------------------------------------------------------------- the numpy reference (before numba)
def ref_normalize(table_bytes: np.ndarray) -> np.ndarray:
    w = rans.WEIGHTS[table_bytes.astype(np.int64)]
    total = w.sum(axis=1, keepdims=True)
    used = total[:, 0] > 0
    f = np.zeros_like(w)
    f[used] = np.maximum((w[used] * M) // total[used], (w[used] > 0).astype(np.int64))
    for c in np.flatnonzero(used):
        row = f[c]
        excess = int(row.sum()) - M
        while excess:
            top = int(np.argmax(row))
            if excess < 0 or row[top] - excess >= 1:
                row[top] -= excess
                excess = 0
            else:
                take = int(row[top]) - 1
                row[top] = 1
                excess -= take
    return f


def ref_encode(streams, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.full(lanes, LOW, dtype=np.int64)
    emitted: list[np.ndarray] = []
    for symbols, contexts, tables in reversed(streams):
        s, c = symbols.astype(np.int64), contexts.astype(np.int64)
        freq, cum = tables.freq[c, s], tables.cum[c, s]
        bound = freq << (32 - PRECISION)
        for j in reversed(range((s.size + lanes - 1) // lanes)):
            lo, hi = j * lanes, min(s.size, (j + 1) * lanes)
            xs = x[: hi - lo]
            out = xs >= bound[lo:hi]
            emitted.append((xs[out] & 0xFFFF)[::-1])
            xs = np.where(out, xs >> 16, xs)
            q, r = np.divmod(xs, freq[lo:hi])
            x[: hi - lo] = (q << PRECISION) + r + cum[lo:hi]
    words = np.concatenate(emitted)[::-1] if emitted else np.zeros(0, dtype=np.int64)
    return x.astype(np.uint32), words.astype(np.uint16)


def ref_slot_tables(tables: rans.Tables):
    sym = np.full((tables.contexts, M), -1, dtype=np.int64)
    freq = np.zeros((tables.contexts, M), dtype=np.int64)
    off = np.zeros((tables.contexts, M), dtype=np.int64)
    for c in np.flatnonzero(tables.freq.sum(axis=1) == M):
        f = tables.freq[c]
        sym[c] = np.repeat(np.arange(tables.alphabet), f)
        freq[c] = np.repeat(f, f)
        off[c] = np.arange(M) - np.repeat(tables.cum[c], f)
    return sym.ravel(), freq.ravel(), off.ravel()


class RefDecoder:
    def __init__(self, states: np.ndarray, words: np.ndarray) -> None:
        self.x, self.words, self.pos = states.astype(np.int64), words.astype(np.int64), 0

    def decode(self, contexts: np.ndarray, tables: rans.Tables) -> np.ndarray:
        n, lanes = contexts.size, self.x.size
        out = np.empty(n, dtype=np.int64)
        sym, freq, off = ref_slot_tables(tables)
        base = contexts.astype(np.int64) * M
        for j in range((n + lanes - 1) // lanes):
            lo, hi = j * lanes, min(n, (j + 1) * lanes)
            xs = self.x[: hi - lo]
            k = base[lo:hi] + (xs & (M - 1))
            out[lo:hi] = sym[k]
            xs = freq[k] * (xs >> PRECISION) + off[k]
            need = xs < LOW
            m = int(np.count_nonzero(need))
            xs[need] = (xs[need] << 16) | self.words[self.pos: self.pos + m]
            self.pos += m
            self.x[: hi - lo] = xs
        return out

    def finished(self) -> bool:
        return self.pos == self.words.size and bool(np.all(self.x == LOW))


def ref_waves(name, idx, buckets, num_buckets, values):
    order = np.argsort(idx, kind="stable")
    bounds = np.searchsorted(idx[order], np.arange(int(idx.max(initial=-1)) + 2))
    for w in range(bounds.size - 1):
        entries = order[bounds[w]:bounds[w + 1]]
        prev = np.full(entries.size, waves.PREV_CAP + 1) if w == 0 else np.minimum(values[name][entries - 1],
                                                                                 waves.PREV_CAP)
        yield name, entries, prev * num_buckets + buckets[entries], (waves.PREV_CAP + 2) * num_buckets


def ref_within(lengths):
    pos = np.repeat(np.arange(lengths.size), lengths)
    return pos, np.arange(pos.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def ref_streams(spec, layout, values):
    """``(name, entries or None, contexts, number of contexts)`` in decode order, as before numba."""
    nb = max(1, int(bit_length(np.array([max(spec.num_samples, 1)]))[0]) + 1)
    gapped = spec.encoding.ids == "rank-delta"
    if spec.has_samples:
        n = int(layout.positions.sum())
        yield "sample_lengths", None, np.zeros(n, np.int64), 1
        lengths = values["sample_lengths"]
        pos, idx = ref_within(lengths)
        if gapped:
            yield from ref_waves("sample_ids", idx, np.minimum(bit_length(idx), 4), 5, values)
            gaps = values.get("sample_ids", np.zeros(0, np.int64))
        else:
            gaps = np.zeros(pos.size, np.int64)
        yield "sample_counts", None, np.minimum(gaps, ent.IDX_CAP) * nb + bit_length(lengths)[pos], 16 * nb
    if spec.has_head:
        if gapped:
            _, idx = ref_within(spec.k - layout.head_flags)
            yield from ref_waves("head_ids", idx, np.minimum(idx // 8, 7), 8, values)
        if spec.encoding.logprobs == "q8":
            n = int(layout.positions.sum())
            yield "head_qmin", None, np.zeros(n, np.int64), 1
            first = np.zeros((n, spec.k), dtype=np.int64)
            first[:, 0] = layout.head_flags
            yield "head_logprobs", None, np.repeat(bit_length(values["head_qmin"]) * 2, spec.k) + first.ravel(), 18


def ref_blob(spec, rows: list[dict[str, bytes]]) -> bytes:
    """The ``entropy`` column the numpy implementation wrote for these row columns."""
    layout = ent._Layout(spec, [{k: np.frombuffer(v, np.uint8) for k, v in r.items()} for r in rows])
    values = ent._row_values(spec, rows, layout)
    parts = [(name, values[name] if entries is None else values[name][entries], ctx, num_ctx)
             for name, entries, ctx, num_ctx in ref_streams(spec, layout, values)]
    tables = {}
    for name in dict.fromkeys(p[0] for p in parts):
        mine = [p for p in parts if p[0] == name]
        sym = np.concatenate([p[1] for p in mine])
        tables[name] = rans.Tables.fit(sym, np.concatenate([p[2] for p in mine]), mine[0][3],
                                       int(sym.max()) + 1 if sym.size else 1)
    lanes = ent.lanes_for(sum(p[1].size for p in parts))
    states, words = ref_encode([(sym, ctx, tables[name]) for name, sym, ctx, _ in parts], lanes)
    packed = rans.pack_tables(list(tables.values()))
    return np.array([lanes, len(packed)], "<u4").tobytes() + packed + states.astype("<u4").tobytes() + \
        words.astype("<u2").tobytes()


def ref_decode(spec, unit) -> dict[str, np.ndarray]:
    """The streams the numpy implementation decoded from a unit's ``entropy`` column."""
    rows = [unit.row(r) for r in range(len(unit))]
    blob = rows[0][ent.COLUMN].tobytes()
    lanes, tlen = (int(v) for v in np.frombuffer(blob[:8], "<u4"))
    tables = rans.unpack_tables(blob[8:8 + tlen])
    decoder = RefDecoder(np.frombuffer(blob[8 + tlen:8 + tlen + 4 * lanes], "<u4"),
                         np.frombuffer(blob[8 + tlen + 4 * lanes:], "<u2"))
    layout = ent._Layout(spec, rows)
    values: dict[str, np.ndarray] = {}
    for name, entries, ctx, _ in ref_streams(spec, layout, values):
        if name not in values:
            size = ctx.size if entries is None else int(  # a wave stream: every entry of its positions
                values["sample_lengths"].sum() if name == "sample_ids" else (spec.k - layout.head_flags).sum())
            values[name] = np.zeros(size, np.int64)
        table = tables[list(values).index(name)]
        decoded = decoder.decode(ctx, table)
        if entries is None:
            values[name] = decoded
        else:
            values[name][entries] = decoded
    assert decoder.finished()
    return values


# ---------------------------------------------------------------- the coder alone


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10**6), lanes=st.integers(1, 1024),
       shapes=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 400), st.integers(1, 8),
                                 st.sampled_from([0.02, 0.3, 5.0])), min_size=1, max_size=4))
def test_compiled_coder_writes_and_reads_the_numpy_coders_bytes(seed, lanes, shapes):
    rng = np.random.default_rng(seed)
    streams = [(sym, ctx, rans.Tables.fit(sym, ctx, c, a)) for sym, ctx, (n, a, c, skew) in
               ((*random_stream(rng, n, a, c, skew), (n, a, c, skew)) for n, a, c, skew in shapes)]
    states, words = rans.encode(streams, lanes)
    ref_states, ref_words = ref_encode(streams, lanes)
    assert states.tobytes() == ref_states.tobytes() and words.tobytes() == ref_words.tobytes()
    compiled, reference = rans.Decoder(ref_states, ref_words), RefDecoder(states, words)
    for sym, ctx, tables in streams:
        assert np.array_equal(compiled.decode(ctx, tables), sym)
        assert np.array_equal(reference.decode(ctx, tables), sym)
    compiled.finish()
    assert reference.finished()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), contexts=st.integers(1, 6), alphabet=st.integers(1, 600),
       used=st.floats(0.0, 1.0))
def test_table_frequencies_match_the_numpy_rounding(seed, contexts, alphabet, used):
    """The rounding loop (compiled) gives the integer frequencies the numpy loop gave."""
    rng = np.random.default_rng(seed)
    table = np.where(rng.random((contexts, alphabet)) < used, rng.integers(1, 256, (contexts, alphabet)), 0)
    table[0, : min(alphabet, 3)] = 255  # a few heavy cells next to many light ones: every rounding branch
    assert np.array_equal(rans.normalize(table.astype(np.uint8)), ref_normalize(table.astype(np.uint8)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), positions=st.integers(1, 3000), longest=st.integers(1, 70),
       lanes=st.sampled_from([1, 16, 37, 128, 1024]), empty=st.sampled_from([0.0, 0.1, 0.6]))
def test_waves_decode_what_the_numpy_reference_coded(seed, positions, longest, lanes, empty):
    """Gap lengths in waves, with positions ending at every wave and some with no entry at all, coded
    by the reference (its wave order and contexts, its coder), decode to the same values in stream order."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(positions) < empty, 0, rng.integers(1, longest + 1, positions))
    lengths[rng.integers(0, positions)] = longest  # at least one entry, and the longest position
    values = np.minimum(rng.geometric(0.3, int(lengths.sum())) - 1, 32)  # gap lengths 0..32
    _, idx = ref_within(lengths)
    parts = [(values[entries], ctx) for _, entries, ctx, _ in
             ref_waves("gaps", idx, np.minimum(idx // 8, 7), ent.HEAD_IDX_BUCKETS, {"gaps": values})]
    tables = rans.Tables.fit(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                             (waves.PREV_CAP + 2) * ent.HEAD_IDX_BUCKETS, 33)
    decoder = rans.Decoder(*ref_encode([(sym, ctx, tables) for sym, ctx in parts], lanes))
    coded = waves.Waves.of(lengths, ent._head_idx_bucket, ent.HEAD_IDX_BUCKETS)
    assert np.array_equal(coded.decode(decoder, tables), values)
    decoder.finish()


# ---------------------------------------------------------------- whole units
def _spec(method, ids, logprobs, k, vocab):
    enc = Encoding(ids=ids, logprobs=logprobs, vocab_size=vocab, order=tuple(range(vocab)) if ids == "rank-delta"
                   else (), entropy="ans")
    return ShardSpec(method=method, encoding=enc, k=k if method != "sample" else 0,
                     num_samples=50 if method in ("sample", "hybrid") else 0)


@settings(max_examples=50, deadline=None)
@given(method=st.sampled_from(["topk", "sample", "hybrid", "full"]), ids=st.sampled_from(["rank-delta", "packed"]),
       logprobs=st.sampled_from(["float32", "q8"]), sequences=st.integers(1, 4), t=st.integers(1, 40),
       seed=st.integers(0, 10**6))
def test_units_are_packed_to_the_numpy_implementations_bytes(method, ids, logprobs, sequences, t, seed):
    vocab = 300 if method != "full" else 40
    rows = [random_row(method, t, vocab, seed + i, k=5) for i in range(sequences)]
    spec = _spec(method, ids, logprobs, vocab if method == "full" else 5, vocab)
    columns = [encode_row(spec.encoding, tok, targets).columns for tok, targets in rows]
    packed = ent.pack_unit(spec, columns)
    assert packed[0][ent.COLUMN] == ref_blob(spec, columns)


@pytest.fixture(scope="module")
def captured_units(tiny_teacher, tmp_path_factory):
    """Real captures (the tiny teacher through ``capture``) under ``--entropy ans``, one per method;
    each as (spec, units as the container returns them, before the entropy stage)."""
    out = []
    for method, over in [("sample", {}), ("topk", {"store.logprob_dtype": "q8"}),
                         ("hybrid", {"store.logprob_dtype": "q8", "sparsify.samples": 50})]:
        path = tmp_path_factory.mktemp(f"ans-{method}")
        capture(make_config(tiny_teacher, path, method, **{"store.entropy": "ans", **over}), progress=False)
        manifest = read_manifest(path)
        spec, fs = spec_from_manifest(manifest.header), StoreFS(path)
        units = [get_container(spec.format).decode_unit(spec, r.index, r.index * spec.sequences_per_shard,
                                                        r.sequences, {o.path: fs.read(o.path) for o in r.objects})
                 for r in manifest.shards]
        out.append((spec, units))
    return out


def test_captured_units_hold_the_numpy_implementations_bytes_and_decode_alike(captured_units):
    for spec, units in captured_units:
        for unit in units:
            restored = ent.unpack_unit(spec, unit)
            rows = [{name: bytes(v) for name, v in restored.row(r).items()} for r in range(len(restored))]
            assert ref_blob(spec, rows) == unit.row(0)[ent.COLUMN].tobytes()
            reference = ref_decode(spec, unit)
            for name in ent.coded_columns(spec):
                if name == "head_logprobs":  # the reference's stream holds codes minus each position's smallest
                    codes = reference["head_logprobs"].reshape(-1, spec.k) + reference["head_qmin"][:, None]
                    expected = codes.astype("u1").tobytes()
                else:
                    dtype = "u1" if name.endswith("_ids") else ent._count_dtype(spec)
                    expected = reference[name].astype(dtype).tobytes()
                assert restored.columns[name][0].tobytes() == expected, name


def test_tables_with_too_few_contexts_for_a_wave_stream_are_refused(captured_units):
    """The compiled decoder reads its tables without bounds checks: a table narrower than the
    contexts a stream can name must be refused before it is read."""
    spec, units = captured_units[0]
    blob = units[0].row(0)[ent.COLUMN].tobytes()
    lanes, tlen = (int(v) for v in np.frombuffer(blob[:8], "<u4"))
    tables = rans.unpack_tables(blob[8:8 + tlen])
    tables[1] = rans.Tables(tables[1].table_bytes[:3])  # sample_ids: 3 of its 95 contexts
    decoder = rans.Decoder(np.frombuffer(blob[8 + tlen:8 + tlen + 4 * lanes], "<u4"),
                           np.frombuffer(blob[8 + tlen + 4 * lanes:], "<u2"))
    layout = ent._Layout(spec, [units[0].row(r) for r in range(len(units[0]))])
    values: dict[str, np.ndarray] = {}
    streams = ent._streams(spec, layout, values)
    _, lengths_ctx, _ = next(streams)
    values["sample_lengths"] = decoder.decode(lengths_ctx, tables[0])
    _, sample_waves, _ = next(streams)
    with pytest.raises(CorruptShardError, match="3 contexts; the stream uses up to 95"):
        sample_waves.decode(decoder, tables[1])


def test_tables_wider_than_the_coder_precision_are_refused():
    with pytest.raises(CorruptShardError, match=f"{M + 1} symbols; at most {M}"):
        rans.Tables(np.zeros((1, M + 1), np.uint8)).lookup
