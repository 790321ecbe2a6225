"""The unit decoder (logitcache.store.unit_decode) gives what decode_row gives row by row, bit for bit, for every
method, id code, logprob code, entropy stage, container, layout and label-logprob store, by its compiled kernel
(logitcache.store.unit_decode_jit) and by its numpy passes; the loader's batches equal
``collate`` of per-row items laid out position by position; corruption raises CorruptShardError either way."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import write_documents_store
from logitcache.errors import CorruptShardError
from logitcache.store.commit import read_manifest
from logitcache.store.fs import StoreFS
from logitcache.store.reader import read_unit
from logitcache.store.spec import spec_from_manifest
from logitcache.store.unit_decode import DecodedUnit, RowsByRow, decode_unit, unit_rows
from logitcache.store.unit_decode_jit import RANK_MAX
from logitcache.store.encoding import Encoding, encode_row
from logitcache.store.units import UnitRows, from_blobs
from logitcache.testing.store_conformance import VOCAB, make_header, make_rows, write_store
from logitcache.testing.targets import assert_equal, build
from logitcache.train.collate import collate
from logitcache.train.dataset import CacheDataset

ORDER = tuple(np.random.default_rng(0).permutation(VOCAB)[:60].tolist())  # ranks that are not ids: sorting matters


def packed_store(root, method, *, fmt="arrow", ids="rank-delta", logprobs="float32", entropy="zstd",
                 weighted=False, n=50, labels=False, t=9, sequences=7, per_shard=3) -> str:
    rows = make_rows(method, sequences, t, seed=11, weighted=weighted)
    if n != 50 or labels:
        rows = [(s, tok, _retargeted(tgt, s, method, n, labels)) for s, tok, tgt in rows]
    header = make_header(method, fmt, sequences=sequences, per_shard=per_shard, ids=ids, logprobs=logprobs,
                         entropy=entropy, weighted=weighted, n=n, seq_len=t, order=ORDER if ids == "rank-delta" else ())
    if labels:
        enc = dataclasses.replace(header.store.encoding, label_logprobs=True)
        header = dataclasses.replace(header, store=dataclasses.replace(header.store, encoding=enc))
    write_store(str(root), header, rows)
    return str(root)


def _retargeted(t, seed, method, n, labels):
    gen = torch.Generator().manual_seed(seed % 2**31)
    if n != 50:
        dense = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.3)).sample((t.num_positions,))
        t = build(method, dense / dense.sum(-1, keepdim=True), gen, k=4, n=n)
    lp = -torch.rand(t.num_positions, generator=gen) * 9 if labels else None
    return dataclasses.replace(t, label_logprobs=lp)


def documents_store(root, method) -> str:
    rng, gen = np.random.default_rng(3), torch.Generator().manual_seed(3)
    rows = []
    for i, length in enumerate([17, 2, 9, 12, 3, 16, 5]):
        tokens = rng.integers(0, VOCAB, length).astype(np.int32)
        mask = rng.random(length - 1) < 0.5
        mask[rng.integers(0, length - 1)] = True
        dense = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.3)).sample((int(mask.sum()),))
        rows.append((500 + i, tokens, mask, build(method, dense / dense.sum(-1, keepdim=True), gen, k=4, n=30)))
    return write_documents_store(str(root), method, rows, "f", per_shard=3, k=4, n=30, seq_len=16)


STORES = {
    **{f"{m}-{fmt}": dict(method=m, fmt=fmt) for m in ("topk", "sample", "hybrid", "full") for fmt in ("arrow", "zarr")},
    "sample-packed-ids": dict(method="sample", ids="packed"),
    "hybrid-packed-q8": dict(method="hybrid", ids="packed", logprobs="q8"),
    "topk-float16": dict(method="topk", logprobs="float16"),
    "sample-weighted": dict(method="sample", weighted=True),
    "sample-ans": dict(method="sample", entropy="ans"),
    "hybrid-q8-ans-zarr": dict(method="hybrid", logprobs="q8", entropy="ans", fmt="zarr"),
    "sample-n300": dict(method="sample", n=300),  # two-byte lengths and counts
    "hybrid-labels": dict(method="hybrid", labels=True),
    "topk-labels-packed-ans": dict(method="topk", labels=True, ids="packed", entropy="ans"),
}


def units(root):
    fs = StoreFS(root)
    manifest = read_manifest(fs)
    spec = spec_from_manifest(manifest.header)
    return spec, [read_unit(fs, spec, record) for record in manifest.shards]


def assert_same_rows(fast, reference) -> None:
    assert len(fast) == len(reference)
    for r in range(len(reference)):
        (seq_id, tokens, mask, targets), (seq_id0, tokens0, mask0, targets0) = fast.row(r), reference.row(r)
        assert seq_id == seq_id0 and tokens.dtype == tokens0.dtype and np.array_equal(tokens, tokens0)
        assert (mask is None) == (mask0 is None) and (mask is None or np.array_equal(mask, mask0))
        assert (targets.method, targets.num_samples) == (targets0.method, targets0.num_samples)
        assert_equal(targets, targets0)
        for name in ("head_ids", "head_logprobs", "tail_mass", "sample_ids", "sample_counts", "label_logprobs"):
            a, b = getattr(targets, name), getattr(targets0, name)
            assert a is None or a.dtype == b.dtype, name


@pytest.mark.parametrize("name", sorted(STORES))
def test_the_unit_decoder_equals_decode_row(tmp_path, name):
    spec, rows_of_units = units(packed_store(tmp_path / name, **STORES[name]))
    for rows in rows_of_units:
        decoded = unit_rows(spec, rows, 0)
        assert isinstance(decoded, DecodedUnit)
        assert_same_rows(decoded, RowsByRow(spec, rows))
        assert_same_rows(decode_unit(spec, rows, compiled=False), RowsByRow(spec, rows))  # the numpy passes


@pytest.mark.parametrize("ids", ["rank-delta", "packed"])
def test_the_compiled_kernel_sorts_the_ids_of_a_large_vocabulary(tmp_path, ids):
    """V = 70,000 (the kernel's bitmap spans many summary words) and ~50 distinct ids a position (bitmap sort),
    a few positions of 1 or 2 (the rank sort); the kernel, the numpy passes and decode_row agree."""
    spec, _ = units(packed_store(tmp_path / "s", "sample", sequences=1, per_shard=1))
    vocab, rng, gen = 70_000, np.random.default_rng(5), torch.Generator().manual_seed(5)
    order = tuple(rng.permutation(vocab)[:9000].tolist()) if ids == "rank-delta" else ()
    spec = dataclasses.replace(spec, encoding=Encoding(ids=ids, vocab_size=vocab, order=order))
    blobs: dict[str, list[bytes]] = {name: [] for name in spec.columns()}
    for t in (12, 1, 30):
        tokens = rng.integers(0, vocab, t + 1)
        dense = torch.distributions.Dirichlet(torch.full((vocab,), 0.05)).sample((t,)).double()
        dense[: t // 3] = torch.nn.functional.one_hot(torch.from_numpy(tokens[1:t // 3 + 1]), vocab)  # label alone
        targets = build("sample", dense / dense.sum(-1, keepdim=True), gen, n=50)
        for name, value in encode_row(spec.encoding, tokens, targets).columns.items():
            blobs[name].append(value)
    rows = from_blobs(np.arange(3), blobs)
    assert_same_rows(decode_unit(spec, rows), RowsByRow(spec, rows))
    assert_same_rows(decode_unit(spec, rows, compiled=False), RowsByRow(spec, rows))


def _label_and_another(spec, rows_of_units):
    """``(rows, row, position, id)``: a position whose label is one of its sampled ids, and another of them."""
    for rows in rows_of_units:
        for r in range(len(rows)):
            _, tokens, _, targets = RowsByRow(spec, rows).row(r)
            off, ids = targets.sample_offsets().numpy(), targets.sample_ids.numpy()
            for p in range(tokens.size - 1):
                mine = ids[off[p]:off[p + 1]]
                if tokens[p + 1] in mine and mine.size > 1:
                    yield rows, r, p, int(mine[mine != tokens[p + 1]][0])


@pytest.mark.parametrize("n", [8, 300])  # few entries a position (the rank sort), many (the bitmap's fallback)
def test_an_id_that_repeats_keeps_its_stored_order_like_decode_row(tmp_path, n):
    """A label that a damaged tokens column makes equal to another of its position's ids: decode_row's stable sort
    puts the label's entry first; the kernel must too."""
    spec, rows_of_units = units(packed_store(tmp_path / "s", "sample", n=n, sequences=12))
    rows, r, p, other = next(_label_and_another(spec, rows_of_units))
    off = RowsByRow(spec, rows).row(r)[3].sample_offsets()
    assert (int(off[p + 1] - off[p]) > RANK_MAX) == (n == 300)  # the path the case is for
    values, col_off = rows.columns["tokens"]
    damaged = values.copy()
    damaged[col_off[r] + 4 * (p + 1):col_off[r] + 4 * (p + 2)] = np.frombuffer(np.int32(other).tobytes(), np.uint8)
    bad = UnitRows(rows.seq_ids, {**rows.columns, "tokens": (damaged, col_off)})
    assert_same_rows(decode_unit(spec, bad), RowsByRow(spec, bad))
    assert_same_rows(decode_unit(spec, bad, compiled=False), RowsByRow(spec, bad))


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("part, damage, message", [
    (part, damage, message.format(part=part)) for part in ("sample", "head") for damage, message in [
        ("symbol", r"^row 1 \(seq_id \d+\): gamma symbol above 32 in {part}_ids$"),
        ("mantissa", r"^row 2 \(seq_id \d+\): column {part}_id_bits holds \d+ bytes; \d+ expected$"),
        ("rank", r"^row 0 \(seq_id \d+\): decoded rank outside the vocabulary of 97 in {part}_ids$"),
        ("id", r"^row 1 \(seq_id \d+\): decoded id outside the vocabulary of 97 in {part}_id_bits$"),
        ("count", r"^row 1 \(seq_id \d+\): decoded a sample count below 1$")] if (part, damage) != ("head", "count")])
def test_the_kernel_and_the_numpy_passes_name_the_damaged_row(tmp_path, compiled, part, damage, message):
    method = {"sample": "sample", "head": "topk"}[part]
    spec, (rows, *_) = units(packed_store(tmp_path / "s", method, ids="packed" if damage == "id" else "rank-delta"))
    column = {"symbol": f"{part}_ids", "mantissa": f"{part}_id_bits", "rank": f"{part}_ids", "id": f"{part}_id_bits",
              "count": "sample_counts"}[damage]
    values, off = rows.columns[column]
    values, row = values.copy(), {"symbol": 1, "mantissa": 2, "rank": 0, "id": 1, "count": 1}[damage]
    if damage == "mantissa":  # one byte fewer in row 2
        values, off = np.delete(values, off[2]), off - (np.arange(off.size) > 2)
    elif damage == "rank":  # as many mantissa bits, in gaps of 64 and more: ranks past V = 97
        width = int(np.maximum(values[off[0]:off[1]].astype(np.int64) - 1, 0).sum())
        symbols = np.zeros(off[1] - off[0], np.uint8)
        symbols[:width // 6], symbols[width // 6] = 7, width % 6 + 1
        values[off[0]:off[1]] = symbols
    else:  # a symbol of 40; a packed id of 127; every count 255 (more than N draws)
        at = slice(off[row], off[row] + 1) if damage != "count" else slice(off[row], off[row + 1])
        values[at] = {"symbol": 40, "id": 255, "count": 255}[damage]
    damaged = UnitRows(rows.seq_ids, {**rows.columns, column: (values, off)})
    with pytest.raises(CorruptShardError):  # the row path refuses the same row (in words of its own)
        RowsByRow(spec, damaged).row(row)
    with pytest.raises(CorruptShardError, match=message):
        decode_unit(spec, damaged, compiled=compiled)


def positionwise(items: list[dict]) -> dict[str, torch.Tensor]:
    """The dense target arrays of ``items`` built position by position from each item's own estimate."""
    b, t = len(items), max(int(item["input_ids"].numel()) for item in items)
    per = [item["targets"].estimate() for item in items]
    u = max(int((off[1:] - off[:-1]).max()) for off, _, _ in per)
    ids, probs, mask = torch.zeros(b, t, u, dtype=torch.int64), torch.zeros(b, t, u), torch.zeros(b, t, u, dtype=bool)
    for row, (item, (off, eids, eprobs)) in enumerate(zip(items, per)):
        trained = item.get("loss_mask")
        cells = torch.arange(item["input_ids"].numel()) if trained is None or off.numel() - 1 == trained.numel() \
            else trained.nonzero()[:, 0]
        for p, cell in enumerate(cells.tolist()):
            n = int(off[p + 1] - off[p])
            ids[row, cell, :n], probs[row, cell, :n] = eids[off[p]:off[p + 1]], eprobs[off[p]:off[p + 1]]
            mask[row, cell, :n] = True
    return {"target_ids": ids, "target_probs": probs, "target_mask": mask}


@pytest.mark.parametrize("kind", ["hybrid-zarr", "sample-weighted", "topk-labels-packed-ans", "documents-hybrid",
                                  "documents-sample"])
def test_loader_batches_equal_per_row_items_collated_position_by_position(tmp_path, kind):
    root = documents_store(tmp_path / kind, kind.split("-")[1]) if kind.startswith("documents") else \
        packed_store(tmp_path / kind, **STORES[kind])
    ds = CacheDataset(root, shuffle=True, seed=1, batch_size=3)
    spec, rows_of_units = units(root)
    reference = {}
    for rows in rows_of_units:  # per-row items: decode_row, as the loader made them before
        by_row = RowsByRow(spec, rows)
        for r in range(len(rows)):
            seq_id, tokens, mask, targets = by_row.row(r)
            tokens = torch.from_numpy(tokens.astype(np.int64))
            labels = tokens[1:] if mask is None else torch.where(torch.from_numpy(mask), tokens[1:], -100)
            reference[seq_id] = {"seq_id": seq_id, "input_ids": tokens[:-1], "labels": labels, "targets": targets,
                                 **({} if mask is None else {"loss_mask": torch.from_numpy(mask)})}
    order = [item["seq_id"] for item in ds]
    batches = list(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=ds.collate))
    assert len(batches) == -(-len(order) // 3)
    for j, batch in enumerate(batches):
        items = [reference[s] for s in order[3 * j:3 * j + 3]]
        expected = {**collate(items), **positionwise(items)}
        for key, value in expected.items():
            got = batch[key]
            assert (torch.equal(got, value) and got.dtype == value.dtype) if isinstance(value, torch.Tensor) \
                else got == value, key


@pytest.mark.parametrize("name", ["hybrid-arrow", "sample-n300", "sample-weighted", "topk-labels-packed-ans"])
def test_damaged_columns_raise_corrupt_shard_error_like_the_row_path(tmp_path, name):
    """Flipped bytes and cut rows in a decoded unit's columns: where decode_row raises CorruptShardError so does
    the unit decoder; where decode_row decodes (a byte of a value, not of the structure), both give the same."""
    spec, (rows, *_) = units(packed_store(tmp_path / name, **STORES[name]))
    names = sorted(rows.columns)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(column=st.sampled_from(names), where=st.floats(0, 1, exclude_max=True), value=st.integers(0, 255),
           cut=st.booleans())
    def check(column, where, value, cut):
        values, off = rows.columns[column]
        if not values.size:
            return
        i = int(where * values.size)
        damaged = np.delete(values, i) if cut else values.copy()
        if not cut:
            damaged[i] = value
        new_off = off - ((off > i) & cut)
        bad = UnitRows(rows.seq_ids, {**rows.columns, column: (damaged, new_off)})
        try:
            reference = [RowsByRow(spec, bad).row(r) for r in range(len(bad))]
        except CorruptShardError:
            with pytest.raises(CorruptShardError, match=r"^row \d+ \(seq_id \d+\): "):
                decode_unit(spec, bad)
            return
        try:
            fast = decode_unit(spec, bad)
        except CorruptShardError as exc:  # stricter than decode_row here, which sorts such an entry out of place
            assert column == "tokens" and "flags a label outside the vocabulary" in str(exc)
            return
        assert_same_rows(fast, _Listed(reference))

    check()


@pytest.mark.parametrize("name, column", [("sample-weighted", "sample_weights"), ("hybrid-arrow", "head_logprobs")])
def test_a_float_damaged_into_nan_decodes_alike_and_compares_equal(tmp_path, name, column):
    """A float32 value whose sign and exponent byte is damaged into NaN decodes as it is by both decoders, and the
    comparison counts a NaN in the same place as equal (torch.equal does not: the case the hypothesis test above met
    by chance) but not a NaN in another place."""
    spec, (rows, *_) = units(packed_store(tmp_path / name, **STORES[name]))
    values, off = rows.columns[column]
    n = int(off[1] - off[0]) // 4  # row 0's floats, stored as 4 byte planes of n bytes (docs/format.md)

    def nan_at(i: int) -> np.ndarray:  # float i of row 0 with its top two bytes 0xFF: a NaN of any mantissa
        out = values.copy()
        out[off[0] + 3 * n + i] = out[off[0] + 2 * n + i] = 0xFF
        return out

    bad = UnitRows(rows.seq_ids, {**rows.columns, column: (nan_at(0), off)})
    fast, reference = decode_unit(spec, bad), _Listed([RowsByRow(spec, bad).row(r) for r in range(len(bad))])
    assert torch.isnan(getattr(fast.row(0)[3], column)).any()
    assert_same_rows(fast, reference)
    moved = nan_at(1)  # the NaN one value further on
    other = UnitRows(rows.seq_ids, {**rows.columns, column: (moved, off)})
    with pytest.raises(AssertionError):  # (a head sorts a NaN last: its ids differ first)
        assert_same_rows(fast, _Listed([RowsByRow(spec, other).row(r) for r in range(len(other))]))


class _Listed:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def row(self, r):
        return self.rows[r]


def test_a_flipped_byte_on_disk_is_refused_before_decoding(tmp_path):
    root = packed_store(tmp_path / "s", "sample")
    path = tmp_path / "s" / "shards" / "00001.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="shard 1: object .* has sha256"):
        list(CacheDataset(root))


def test_a_damaged_unit_is_named_with_its_row(tmp_path):
    spec, (rows, *_) = units(packed_store(tmp_path / "s", "hybrid"))
    values, off = rows.columns["sample_counts"]
    cut = UnitRows(rows.seq_ids, {**rows.columns, "sample_counts": (values[:-1], np.minimum(off, values.size - 1))})
    with pytest.raises(CorruptShardError, match=rf"^shard 4: row {len(rows) - 1} \(seq_id \d+\): column sample_counts "
                                                r"holds \d+ bytes; \d+ expected"):
        unit_rows(spec, cut, 4)
