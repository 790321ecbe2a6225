"""The unit decoder (logitcache.store.unit_decode) gives what decode_row gives row by row, bit for bit, for every
method, id code, logprob code, entropy stage, container, layout and label-logprob store; the loader's batches equal
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
from logitcache.store.units import UnitRows
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


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid", "full"])
def test_documents_units_decode_like_rows(tmp_path, method):
    spec, rows_of_units = units(documents_store(tmp_path / method, method))
    for rows in rows_of_units:
        assert_same_rows(decode_unit(spec, rows), RowsByRow(spec, rows))


def test_a_unit_with_a_column_the_decoder_does_not_know_goes_row_by_row(tmp_path):
    spec, (rows, *_) = units(packed_store(tmp_path / "s", "sample"))
    newer = UnitRows(rows.seq_ids, {**rows.columns, "sample_budget": rows.columns["sample_lengths"]})
    assert isinstance(unit_rows(spec, newer, 0), RowsByRow)


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
