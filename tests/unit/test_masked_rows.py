"""The ``documents`` layout on the store side: masked rows (a ``train_mask`` column) with compact targets
(one target row per trained position) round trip through every method, id code, entropy stage and container;
the manifest says format_version 3 and layout ``documents`` and is refused when they disagree; bad masks
are refused at write time and damaged ones at read time (docs/format.md, "Layouts")."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

from logitcache.errors import CorruptShardError, StoreError, StoreMismatchError, TargetsError
from logitcache.store import inspect_store, iter_sequences, open_hf_dataset, read_manifest, verify_store
from logitcache.store.commit import begin_store, commit_unit, finalize_store
from logitcache.store.containers import get_container
from logitcache.store.convert import convert
from logitcache.store.encoding import Encoding, corpus_order, encode_row
from logitcache.store.row_decode import decode_row, row_mask
from logitcache.store.entropy import pack_unit, unpack_unit
from logitcache.store.fs import StoreFS
from logitcache.store.manifest import HEADER_DIGEST, Manifest, ShardRecord, header_digest
from logitcache.store.spec import ShardSpec, spec_from_manifest
from logitcache.store.units import from_blobs
from logitcache.store.writer import encode_and_commit, encode_unit
from logitcache.testing.store_conformance import VOCAB, make_header, make_rows, write_store
from logitcache.targets import SparseTargets
from logitcache.testing.targets import assert_equal, canonical, random_row

METHODS = ["topk", "sample", "hybrid", "full"]
# odd shapes: L = 2; all positions trained; only the last; a mask of 17 (not a multiple of 8); a random one
MASKS = [np.array([True]), np.ones(9, bool), np.eye(1, 8, 7, dtype=bool)[0], np.arange(17) % 2 == 0,
         np.random.default_rng(5).random(12) < 0.5]


def masked_row(method: str, mask: np.ndarray, seed: int, weighted: bool = False) -> tuple[np.ndarray, SparseTargets]:
    """``(tokens int32[L], compact targets)`` for ``mask`` bool[L - 1]: :func:`random_row`'s targets over the
    trained positions, their labels placed where the mask is set (so label-first applies), other tokens random."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        labelled, targets = random_row(method, int(mask.sum()), VOCAB, seed, k=4, weighted=weighted)
    tokens = np.random.default_rng(seed).integers(0, VOCAB, mask.size + 1).astype(np.int32)
    tokens[1:][mask] = labelled[1:]
    return tokens, targets


def documents_rows(method: str, weighted: bool = False, seed: int = 0) -> list[tuple]:
    """``(seq_id, tokens, mask, targets)`` per row, one for each of :data:`MASKS`."""
    rows = []
    for i, mask in enumerate(MASKS):
        tokens, targets = masked_row(method, mask, seed * 100 + i, weighted)
        rows.append((1000 + i, tokens, mask, targets))
    return rows


def documents_header(method: str, fmt: str, rows: list[tuple], *, ids="rank-delta", entropy="zstd",
                     logprobs="float32", per_shard=2):
    order = corpus_order(np.concatenate([r[1] for r in rows]), VOCAB) if ids == "rank-delta" else ()
    header = make_header(method, fmt, sequences=len(rows), per_shard=per_shard, ids=ids, order=order,
                         seq_len=max(r[1].size for r in rows) - 1, entropy=entropy, logprobs=logprobs,
                         weighted=any(r[3].sample_weights is not None for r in rows))
    return dataclasses.replace(header, layout="documents")


def write_documents_store(root: str, header, rows: list[tuple]) -> list[ShardRecord]:
    """``rows`` written as a capture writes them: begin_store, encode_and_commit per unit, finalize_store."""
    fs, spec = StoreFS(root), spec_from_manifest(header)
    begin_store(fs, header, get_container(spec.format).static_objects(spec), overwrite=False)
    per, records = spec.sequences_per_shard, []
    for index in range(-(-len(rows) // per)):
        part = rows[index * per:(index + 1) * per]
        records.append(encode_and_commit(spec, index, [r[0] for r in part], [r[1] for r in part],
                                         [r[3] for r in part], [r[2] for r in part], root=root))
    finalize_store(fs, header, records)
    return records


def assert_rows_equal(back: list[tuple], rows: list[tuple]) -> None:
    assert len(back) == len(rows)
    for (sid, tokens, mask, targets), (want_sid, want_tokens, want_mask, want) in zip(back, rows):
        assert sid == want_sid and np.array_equal(tokens, want_tokens) and np.array_equal(mask, want_mask)
        assert targets.num_positions == int(want_mask.sum())
        assert_equal(targets, canonical(want))


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
@pytest.mark.parametrize("entropy", ["zstd", "ans"])
@pytest.mark.parametrize("ids", ["rank-delta", "packed"])
@pytest.mark.parametrize("method", METHODS)
def test_masked_rows_round_trip_through_a_store(tmp_path, method, ids, entropy, fmt):
    rows = documents_rows(method, weighted=method == "sample", seed=len(method))
    header = documents_header(method, fmt, rows, ids=ids, entropy=entropy)
    records = write_documents_store(str(tmp_path / "s"), header, rows)
    assert sum(r.positions for r in records) == sum(int(m.sum()) for m in MASKS)  # trained positions
    assert_rows_equal(list(iter_sequences(tmp_path / "s", with_mask=True)), rows)
    assert [len(r) for r in iter_sequences(tmp_path / "s")] == [3] * len(rows)  # without with_mask: as before
    assert verify_store(tmp_path / "s").ok


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"L{m.size + 1}")
@pytest.mark.parametrize("method", METHODS)
def test_a_masked_row_decodes_to_its_tokens_mask_and_targets(method, mask):
    tokens, targets = masked_row(method, mask, seed=7)
    enc = Encoding(ids="rank-delta", vocab_size=VOCAB, order=corpus_order(tokens, VOCAB))
    columns = {c: np.frombuffer(b, np.uint8) for c, b in encode_row(enc, tokens, targets, mask).columns.items()}
    assert columns["train_mask"].size == math.ceil(mask.size / 8)
    back_tokens, back = decode_row(enc, method, targets.num_samples, 0 if method == "sample" else
                                   targets.head_ids.shape[1], columns)
    assert np.array_equal(back_tokens, tokens) and np.array_equal(row_mask(columns), mask)
    assert_equal(back, canonical(targets))


@pytest.mark.parametrize("method", METHODS)
def test_an_all_true_mask_changes_nothing_but_the_mask_column(method):
    """A masked row over every position holds exactly the packed row's bytes plus ``train_mask``."""
    tokens, targets = random_row(method, 11, VOCAB, seed=2, k=4)
    enc = Encoding(ids="packed", vocab_size=VOCAB)
    packed = encode_row(enc, tokens, targets).columns
    masked = encode_row(enc, tokens, targets, np.ones(11, bool)).columns
    assert list(masked) == ["tokens", "train_mask", *list(packed)[1:]]
    assert {c: b for c, b in masked.items() if c != "train_mask"} == packed
    assert row_mask({c: np.frombuffer(b, np.uint8) for c, b in packed.items()}) is None


@pytest.mark.parametrize("logprobs", ["float32", "float16", "q8"])
@pytest.mark.parametrize("method", METHODS)
def test_the_ans_stage_restores_every_column_of_masked_rows(method, logprobs):
    """Per row the coded streams count ``mask.sum()`` positions, not ``L - 1`` (a unit of the odd shapes)."""
    rows = documents_rows(method, seed=3)
    k = 0 if method == "sample" else rows[0][3].head_ids.shape[1]
    enc = Encoding(ids="rank-delta", logprobs=logprobs, vocab_size=VOCAB, order=tuple(range(VOCAB)), entropy="ans")
    spec = ShardSpec(method=method, encoding=enc, k=k, num_samples=50 if method in ("sample", "hybrid") else 0,
                     masked=True)
    columns = [encode_row(enc, tokens, targets, mask).columns for _, tokens, mask, targets in rows]
    packed = pack_unit(spec, columns)
    unit = from_blobs(np.arange(len(rows), dtype=np.uint64), {c: [r[c] for r in packed] for c in spec.columns()})
    back = unpack_unit(spec, unit)
    for r, original in enumerate(columns):
        assert {c: bytes(v) for c, v in back.row(r).items()} == original


# ---------------------------------------------------------------- a documents store end to end

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A hybrid documents store (arrow, zstd, rank-delta) and its rows."""
    rows = documents_rows("hybrid", seed=11)
    root = tmp_path_factory.mktemp("docs") / "s"
    write_documents_store(str(root), documents_header("hybrid", "arrow", rows), rows)
    return root, rows


def test_the_manifest_and_inspect_name_the_layout(store):
    root, rows = store
    raw = json.loads((root / "manifest.json").read_text())
    assert raw["format_version"] == 3 and raw["layout"] == "documents"
    info = inspect_store(root)
    assert info["layout"] == "documents" and info["format_version"] == 3 and not info["problems"]
    assert info["positions"] == sum(int(r[2].sum()) for r in rows)
    assert spec_from_manifest(read_manifest(root).header).masked


def test_packed_stores_keep_version_2_without_a_layout_key(tmp_path):
    header = make_header("topk", "arrow", sequences=2, per_shard=1, seq_len=6, ids="packed")
    write_store(str(tmp_path / "p"), header, make_rows("topk", 2, 6, seed=1))
    raw = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert raw["format_version"] == 2 and "layout" not in raw
    assert inspect_store(tmp_path / "p")["layout"] == "packed"
    assert all(mask is None for _, _, mask, _ in iter_sequences(tmp_path / "p", with_mask=True))


@pytest.mark.parametrize("options", [{"format": "zarr", "entropy": "ans"}, {"logprob_dtype": "q8", "ids": "packed"}])
def test_convert_keeps_the_layout_and_every_mask(store, tmp_path, options):
    root, rows = store
    convert(str(root), str(tmp_path / "c"), **options)
    assert inspect_store(tmp_path / "c")["layout"] == "documents" and verify_store(tmp_path / "c").ok
    back = list(iter_sequences(tmp_path / "c", with_mask=True))
    if "logprob_dtype" in options:  # lossy: convert compared the targets within q8's bound; masks are exact
        assert all(np.array_equal(b[2], r[2]) and np.array_equal(b[1], r[1]) for b, r in zip(back, rows, strict=True))
    else:
        assert_rows_equal(back, rows)


def test_the_hf_dataset_carries_the_train_mask(store, tmp_path):
    root, rows = store
    ds = open_hf_dataset(root, cache_dir=str(tmp_path / "hf"))
    assert [r["train_mask"] for r in ds] == [r[2].tolist() for r in rows]
    assert ds[0]["tokens"] == rows[0][1].tolist()


def test_resuming_a_packed_store_with_a_documents_header_is_refused(tmp_path):
    header = make_header("topk", "arrow", sequences=2, per_shard=1, seq_len=6)
    begin_store(StoreFS(tmp_path / "s"), header, [], overwrite=False)
    with pytest.raises(StoreMismatchError, match="layout: store has 'packed', this run has 'documents'"):
        begin_store(StoreFS(tmp_path / "s"), dataclasses.replace(header, layout="documents"), [], overwrite=False)


# ---------------------------------------------------------------- refusals at write time

def test_bad_masks_are_refused_when_written():
    tokens, targets = masked_row("hybrid", MASKS[4], seed=1)
    enc = Encoding(ids="packed", vocab_size=VOCAB)
    with pytest.raises(TargetsError, match=re.escape("a train mask is bool[11]; the row has 13 tokens, so expected "
                                                     "bool[12]")):
        encode_row(enc, tokens, targets, MASKS[4][:-1])
    with pytest.raises(TargetsError, match=re.escape("a train mask is int64[12]")):
        encode_row(enc, tokens, targets, MASKS[4].astype(np.int64))
    with pytest.raises(TargetsError, match=re.escape("a masked row has 1 token(s); expected at least 2")):
        encode_row(enc, tokens[:1], targets, np.zeros(0, bool))
    more = MASKS[4].copy()
    more[np.flatnonzero(~more)[0]] = True
    with pytest.raises(TargetsError, match=rf"targets cover {targets.num_positions} positions; the train mask marks "
                                           rf"{targets.num_positions + 1} of the row's 12\. Expected compact"):
        encode_row(enc, tokens, targets, more)


def test_masks_must_agree_with_the_stores_layout():
    rows = documents_rows("topk")
    masked = spec_from_manifest(documents_header("topk", "arrow", rows))
    packed = dataclasses.replace(masked, masked=False)
    args = ([r[0] for r in rows[:2]], [r[1] for r in rows[:2]], [r[3] for r in rows[:2]])
    with pytest.raises(TargetsError, match="unit 0: the store's layout is documents, so every row needs a train mask"):
        encode_unit(masked, 0, *args)
    with pytest.raises(TargetsError, match="unit 0: the store's layout is packed .* found 2 train masks"):
        encode_unit(packed, 0, *args, [r[2] for r in rows[:2]])
    with pytest.raises(TargetsError, match="unit 0: 1 train masks for 2 rows; expected one per row"):
        encode_unit(masked, 0, *args, [rows[0][2]])


# ---------------------------------------------------------------- damaged masks at read time

def _columns(method: str, mask: np.ndarray) -> tuple[Encoding, int, dict[str, np.ndarray]]:
    tokens, targets = masked_row(method, mask, seed=4)
    enc = Encoding(ids="rank-delta", vocab_size=VOCAB, order=corpus_order(tokens, VOCAB))
    k = 0 if method == "sample" else targets.head_ids.shape[1]
    return enc, k, {c: np.frombuffer(b, np.uint8) for c, b in encode_row(enc, tokens, targets, mask).columns.items()}


@pytest.mark.parametrize("method", METHODS)
def test_a_flipped_mask_bit_is_a_corrupt_row(method):
    """One bit more or less in the mask moves every position count: the row no longer decodes."""
    for flip in (0, 1):  # a trained position dropped (bit 0 is set), an untrained one added (bit 1 is not)
        enc, k, columns = _columns(method, MASKS[3])
        bits = np.unpackbits(columns["train_mask"])
        bits[flip] ^= 1
        with pytest.raises(CorruptShardError):
            decode_row(enc, method, 50, k, {**columns, "train_mask": np.packbits(bits)})


def test_a_mask_of_the_wrong_size_or_with_stray_bits_is_refused():
    enc, k, columns = _columns("topk", MASKS[3])  # 17 positions: 3 bytes, 7 padding bits
    with pytest.raises(CorruptShardError, match="train mask holds 2 bytes for a row of 18 tokens; 3 expected"):
        decode_row(enc, "topk", 0, k, {**columns, "train_mask": columns["train_mask"][:2]})
    stray = columns["train_mask"].copy()
    stray[-1] |= 1
    with pytest.raises(CorruptShardError, match="train mask has bits set past the row's last position"):
        row_mask({**columns, "train_mask": stray})


@pytest.mark.parametrize("entropy", ["zstd", "ans"])
@pytest.mark.parametrize("method", ["sample", "hybrid"])
@pytest.mark.parametrize("row, damage", [(1, "invert"), (3, "invert"), (3, "drop")])
def test_a_unit_with_a_damaged_mask_but_valid_checksums_fails_verify(tmp_path, method, entropy, row, damage):
    """The unit's objects and record are consistent (as if written by a buggy writer); one row's mask is not:
    every bit inverted, or its first trained position dropped."""
    rows = documents_rows(method, seed=6)[:4]
    header = documents_header(method, "arrow", rows, entropy=entropy, per_shard=4)
    fs, spec = StoreFS(tmp_path / "s"), spec_from_manifest(header)
    begin_store(fs, header, [], overwrite=False)
    columns = [encode_row(spec.encoding, tokens, targets, mask).columns for _, tokens, mask, targets in rows]
    if entropy == "ans":
        columns = pack_unit(spec, columns)
    mask = rows[row][2].copy()
    if damage == "invert":
        mask = ~mask
    else:
        mask[np.argmax(mask)] = False
    columns[row]["train_mask"] = np.packbits(mask).tobytes()
    objects = get_container("arrow").encode_unit(spec, 0, 0, [r[0] for r in rows], columns)
    record = ShardRecord.build(0, sequences=4, positions=10, entries=1, objects=objects,
                               header_sha256=spec.header_sha256)
    commit_unit(fs, record, objects)
    problems = verify_store(tmp_path / "s").problems
    assert len(problems) == 1 and problems[0].startswith("shard 0: ")
    with pytest.raises(CorruptShardError):
        list(iter_sequences(tmp_path / "s"))


# ---------------------------------------------------------------- manifests

def _forged(change) -> dict:
    rows = documents_rows("topk")
    header = documents_header("topk", "arrow", rows, per_shard=5)
    record = ShardRecord.build(0, sequences=5, positions=sum(int(m.sum()) for m in MASKS), entries=5,
                               objects=[("shards/00000.arrow", b"x")], header_sha256=header.to_dict()[HEADER_DIGEST])
    manifest = Manifest(header, True, (record,)).to_dict()
    change(manifest)
    return {**manifest, HEADER_DIGEST: header_digest(manifest)}


def test_a_documents_manifest_reads_back_as_written():
    manifest = _forged(lambda m: None)
    assert Manifest.from_dict(manifest).to_dict() == manifest and Manifest.from_dict(manifest).header.masked


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("layout"), "layout is None; expected 'documents' in a format_version 3 manifest"),
    (lambda m: m.update(format_version=2), "layout is 'documents'; expected absent in a format_version 2 manifest"),
    (lambda m: m.update(layout="chat"), "layout is 'chat'; expected 'documents' in a format_version 3 manifest"),
    (lambda m: m.update(format_version=4), "has format_version 4; this logitcache reads version 2 (packed) and 3"),
    (lambda m: m["shards"][0].update(positions=5 * 17 + 1),
     "shards[0].positions is 86; expected at most sequences × seq_len = 5 × 17"),
])
def test_manifests_whose_version_layout_or_positions_disagree_are_refused(change, message):
    with pytest.raises(StoreError, match=re.escape(message)):
        Manifest.from_dict(_forged(change), "S/manifest.json")
