"""The manifest as a typed value: every store a capture writes reads back as a :class:`Manifest` that gives
back the exact bytes on disk, and ``from_dict`` refuses each hostile manifest with the message `verify` and
the dataset print (tests/unit/test_corruption.py)."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from logitcache.capture import capture
from logitcache.errors import CorruptShardError, StoreError
from logitcache.store import read_manifest, verify_store
from logitcache.store.commit import dump_json
from logitcache.store.encoding import Encoding
from logitcache.store.manifest import (HEADER_DIGEST, Manifest, ManifestHeader, ShardRecord, StoreSection,
                                      header_digest)
from logitcache.store.reader import iter_sequences
from logitcache.testing.crash import tree_bytes
from helpers import HOSTILE_FIELDS, as_interrupted, make_config

SHAPE = {"corpus.seq_len": 16, "corpus.max_tokens": 16 * 3 * 4, "store.sequences_per_shard": 3}  # HOSTILE_FIELDS'
VARIANTS = {  # every method, each container, both entropy stages, both id codes, lossy and weighted rows
    "topk": {},
    "sample": {"sparsify.temperature": 0.5},
    "hybrid": {"store.format": "zarr", "store.entropy": "ans", "store.logprob_dtype": "q8"},
    "full": {"store.ids": "packed"},
}


@pytest.fixture(scope="module")
def stores(tiny_teacher, tmp_path_factory):
    """``method -> (store path, what capture returned)``, one small store per method."""
    root = tmp_path_factory.mktemp("manifest")
    out = {}
    for method, over in VARIANTS.items():
        config = make_config(tiny_teacher, root / method, method, **SHAPE, **over)
        out[method] = (root / method, capture(config, progress=False))
    return out


def on_disk(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def forged(manifest: dict) -> dict:
    """``manifest`` with its header digest recomputed, as a deliberate forger would."""
    return {**manifest, HEADER_DIGEST: header_digest(manifest)}


@pytest.mark.parametrize("method", VARIANTS)
def test_a_store_reads_back_as_the_typed_manifest_it_was_written_from(stores, method):
    store, summary = stores[method]
    manifest = read_manifest(store)
    assert manifest == summary.manifest  # what the writer built is what the reader parses
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert dump_json(manifest.to_dict()) == (store / "manifest.json").read_bytes()  # the same bytes
    assert manifest.complete and len(manifest.shards) == manifest.header.plan.shards == 4
    assert manifest.header.method == method and verify_store(store).ok


def test_the_typed_fields_are_the_recorded_ones(stores):
    header = read_manifest(stores["hybrid"][0]).header
    raw = on_disk(stores["hybrid"][0])
    assert header.store.format == "zarr" and header.store.encoding.entropy == "ans"
    assert header.store.encoding.logprobs == "q8" and header.tokenizer.fingerprint == raw["tokenizer"]["fingerprint"]
    assert header.plan.sequences == raw["plan"]["sequences"] == 12 and header.seq_len == 16
    assert header.to_dict()[HEADER_DIGEST] == raw[HEADER_DIGEST]
    assert read_manifest(stores["sample"][0]).header.weighted and not header.weighted


def test_an_in_progress_store_reads_back_from_its_commit_records(stores, tmp_path):
    store = shutil.copytree(stores["topk"][0], tmp_path / "s")
    final = read_manifest(store)
    as_interrupted(store, committed=3)
    partial = read_manifest(store)
    assert not partial.complete and partial.header == final.header and partial.shards == final.shards[:3]


def test_shard_records_round_trip_and_name_their_file(stores):
    for record in read_manifest(stores["full"][0]).shards:
        assert ShardRecord.from_dict(record.to_dict()) == record
    damaged = dict(read_manifest(stores["full"][0]).shards[0].to_dict(), entries=-1)
    with pytest.raises(StoreError, match=r"^commits/00000.json: shard.entries is -1; expected an integer in \[0, "):
        ShardRecord.from_dict(damaged, "commits/00000.json")


@pytest.mark.parametrize("change, message", HOSTILE_FIELDS)
def test_each_hostile_manifest_is_refused_by_name(stores, change, message):
    manifest = on_disk(stores["hybrid"][0])
    change(manifest)
    with pytest.raises(StoreError) as info:
        Manifest.from_dict(forged(manifest), "S/manifest.json")
    assert str(info.value).startswith("S/manifest.json: ") and message in str(info.value)


@pytest.mark.parametrize("change, error, message", [
    (lambda m: m["params"].update(samples=11), StoreError, "a header field was changed"),  # digest not forged
    (lambda m: m.update(format="other"), StoreError, "is not a logitcache manifest (format='other')"),
    (lambda m: m.update(format_version=99), StoreError, "has format_version 99; this logitcache reads version 2"),
    (lambda m: m["store"].update(format="tar"), StoreError, "store.format is 'tar'; expected one of arrow, zarr"),
    (lambda m: m["store"]["encoding"].update(version=9), CorruptShardError, "store encoding version 9"),
    (lambda m: m["store"]["encoding"].update(ids="gzip"), StoreError, "store.encoding is {"),
    (lambda m: m["params"].update(samples="many"), StoreError, "params.samples is 'many'"),
    (lambda m: m["plan"].pop("positions"), StoreError, "plan.positions is missing"),
    (lambda m: m.update(written_by=3), StoreError, "written_by is 3; expected a string"),
])
def test_header_fields_the_typed_value_holds_are_checked(stores, change, error, message):
    manifest = on_disk(stores["hybrid"][0])
    change(manifest)
    if message != "a header field was changed":
        manifest = forged(manifest)
    with pytest.raises(error, match=re.escape(message)):
        Manifest.from_dict(manifest)


def test_a_manifest_that_is_no_mapping_is_refused():
    with pytest.raises(StoreError, match=r"manifest: manifest is \[1\]; expected a mapping"):
        Manifest.from_dict([1])


def test_commit_records_beyond_the_plan_are_refused(stores):
    manifest = read_manifest(stores["topk"][0])
    extra = copy.deepcopy(manifest.shards[0].to_dict())
    extra["index"] = 7
    with pytest.raises(StoreError, match=r"shards\[4\].index is 7; expected a unique index below plan.shards = 4"):
        Manifest(manifest.header).with_shards([*manifest.shards, ShardRecord.from_dict(extra)], "S")


def test_a_converted_header_records_the_options_and_a_fresh_digest(stores):
    header = read_manifest(stores["topk"][0]).header
    store = StoreSection(format="zarr", compression="zstd", compression_level=3, encoding=header.store.encoding)
    converted = header.converted(store, {"format": "zarr", "compression_level": 3})
    assert converted.identity["store"]["format"] == "zarr" and header.identity["store"]["format"] == "arrow"
    assert ManifestHeader.from_dict(converted.to_dict()) == converted
    assert converted.to_dict()[HEADER_DIGEST] != header.to_dict()[HEADER_DIGEST]


# -- row lengths (documents stores) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def documents(tiny_teacher, tmp_path_factory) -> Path:
    """A documents store captured from eight text documents of different lengths (one truncated at seq_len)."""
    root = tmp_path_factory.mktemp("documents_manifest")
    (root / "docs").mkdir()
    for i in range(8):
        (root / "docs" / f"{i}.txt").write_text("ab " * (3 * i + 1) if i < 7 else "ab " * 40)
    config = make_config(tiny_teacher, root / "store", "topk", **{"corpus.layout": "documents",
                                                                  "corpus.source": str(root / "docs"),
                                                                  "corpus.seq_len": 24, "corpus.max_tokens": None,
                                                                  "corpus.long_sequences": "truncate"})
    capture(config, progress=False)
    return root / "store"


def test_documents_records_list_each_rows_token_count_and_packed_ones_none(documents, stores):
    from logitcache.store import iter_sequences

    manifest = read_manifest(documents)
    lengths = [n for record in manifest.shards for n in record.lengths]
    assert lengths == [tokens.size for _, tokens, _ in iter_sequences(documents)]  # the rows, read back
    assert len(set(lengths)) > 3 and max(lengths) == 24 + 1  # different lengths; the long one truncated
    assert dump_json(manifest.to_dict()) == (documents / "manifest.json").read_bytes()
    assert Manifest.from_dict(manifest.to_dict()) == manifest and verify_store(documents).ok
    for store, _ in stores.values():  # packed stores: no key at all (their bytes are unchanged)
        assert all("lengths" not in entry for entry in on_disk(store)["shards"])
        assert all(record.lengths is None for record in read_manifest(store).shards)


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(lengths=e["lengths"][:-1]), "shards[0].lengths is [{}]; expected a list of 3 token counts"),
    (lambda e: e.update(lengths=e["lengths"][:2] + [1]), "shards[0].lengths[2] is 1; expected an integer in [2, "),
    (lambda e: e.update(lengths=e["lengths"][:2] + ["9"]), "shards[0].lengths[2] is '9'; expected an integer"),
    (lambda e: e.update(lengths=e["lengths"][:2] + [26]),
     "shards[0].lengths[2] is 26; expected at most seq_len + 1 = 25"),
    (lambda e: e.update(lengths=[2, 2, 2]), "shards[0].positions is {}; expected at most the unit's input positions, "
                                            "sum(lengths) − sequences = 3"),
    (lambda e: e.update(lengths="17,17,17"), "shards[0].lengths is '17,17,17'; expected a list of 3 token counts"),
])
def test_hostile_row_lengths_are_refused_by_name(documents, change, message):
    manifest = on_disk(documents)
    entry = manifest["shards"][0]
    message = message.format(", ".join(map(str, entry["lengths"][:-1])) if "list of" in message else entry["positions"])
    change(entry)
    with pytest.raises(StoreError) as info:
        Manifest.from_dict(manifest, "S/manifest.json")
    assert str(info.value).startswith("S/manifest.json: ") and message in str(info.value)


def test_row_lengths_in_a_packed_store_are_refused(stores):
    manifest = on_disk(stores["topk"][0])
    manifest["shards"][1]["lengths"] = [17, 17, 17]
    with pytest.raises(StoreError, match=r"shards\[1\].lengths is \[17, 17, 17\]; expected absent in a packed store"):
        Manifest.from_dict(manifest)


@pytest.mark.parametrize("method, field, value, expected", [
    ("topk", "generation", {"response_tokens": 3, "max_response_tokens": 1, "finish_codes": [3]},
     "expected absent in a store that is not of teacher-generated responses"),
    ("sample", "sample_totals", [48], "expected absent in a store of a fixed sample budget"),
])
def test_a_field_of_another_kind_of_store_is_refused(stores, method, field, value, expected):
    """A unit's generation counts belong to a generated store and its draws histogram to an adaptive one; read
    from any other store's record they would be ignored, so they are refused by name."""
    manifest = on_disk(stores[method][0])
    assert Manifest.from_dict(manifest)  # as written
    manifest["shards"][1][field] = value
    with pytest.raises(StoreError, match=rf"shards\[1\]\.{field} is .*; {expected}"):
        Manifest.from_dict(manifest)


def test_verify_finds_a_recorded_length_that_is_not_the_rows(documents, tmp_path):
    store = shutil.copytree(documents, tmp_path / "s")
    manifest = on_disk(store)
    entry = manifest["shards"][1]
    row = next(r for r, n in enumerate(entry["lengths"]) if n < 25)  # room to claim one token more
    entry["lengths"][row] += 1
    (store / "manifest.json").write_bytes(dump_json(manifest))
    from logitcache.store import iter_sequences

    seq_id, tokens, _ = list(iter_sequences(documents))[3 + row]  # shard 1 (three rows per shard)
    assert verify_store(store).problems == [f"shard 1 row {row} (seq_id {seq_id}) holds {tokens.size} tokens; the "
                                            f"manifest records lengths[{row}] = {tokens.size + 1}"]


# -- a store read or resumed where zlib writes other bytes (zlib-ng, another version) -------------------------
class _OtherZlib:
    """zlib as another build has it: every stream it is given decodes as before, but what it writes for the
    same data differs (fixed Huffman codes here; zlib-ng's and other versions' level-9 output differs too)."""

    def __getattr__(self, name):
        return getattr(zlib, name)

    @staticmethod
    def compress(data, level=-1):
        packer = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_FIXED)
        return packer.compress(data) + packer.flush()


@pytest.fixture
def other_zlib(monkeypatch):
    from logitcache.store import encoding

    monkeypatch.setattr(encoding, "zlib", _OtherZlib())


def written_here(encoding: Encoding) -> str:
    """``vocab_order`` as this (patched) zlib writes the same rank order."""
    from logitcache.store import encoding as module

    return base64.b64encode(module.zlib.compress(np.asarray(encoding.order, "<u4").tobytes(), 9)).decode()


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid"])  # the rank-delta stores (arrow and zarr, both stages)
def test_a_store_reads_where_zlib_writes_other_bytes(stores, method, other_zlib):
    store, _ = stores[method]
    manifest = read_manifest(store)
    assert written_here(manifest.header.store.encoding) != on_disk(store)["store"]["encoding"]["vocab_order"]
    assert dump_json(manifest.to_dict()) == (store / "manifest.json").read_bytes()  # the text as read, not redone
    assert verify_store(store).ok
    assert len(list(iter_sequences(store))) == manifest.header.plan.sequences


def test_a_resume_where_zlib_writes_other_bytes_keeps_the_committed_units(stores, tiny_teacher, tmp_path,
                                                                            other_zlib):
    reference = stores["topk"][0]
    store = shutil.copytree(reference, tmp_path / "s")
    as_interrupted(store, committed=2)
    summary = capture(make_config(tiny_teacher, store, "topk", **SHAPE), progress=False)
    assert (summary.units_skipped, summary.units_written) == (2, 2)  # not recaptured under a new digest
    assert tree_bytes(store) == tree_bytes(reference)


def test_a_resume_with_the_teacher_moved_and_another_logitcache_keeps_the_committed_units(stores, tiny_teacher,
                                                                                         tmp_path, monkeypatch):
    from logitcache.capture import pipeline

    reference = stores["topk"][0]
    store = shutil.copytree(reference, tmp_path / "s")
    as_interrupted(store, committed=2)
    moved = shutil.copytree(tiny_teacher, tmp_path / "elsewhere")  # the same weights at another path
    monkeypatch.setattr(pipeline, "__version__", "9.9.9")  # and an upgraded logitcache
    summary = capture(make_config(str(moved), store, "topk", **SHAPE), progress=False)
    assert (summary.units_skipped, summary.units_written) == (2, 2)
    assert tree_bytes(store) == tree_bytes(reference)  # the manifest keeps the path and version it started with


def test_a_resume_with_other_teacher_weights_is_refused_naming_them(stores, tiny_teacher, tmp_path):
    from safetensors.torch import load_file, save_file

    from logitcache.errors import StoreMismatchError

    store = shutil.copytree(stores["topk"][0], tmp_path / "s")
    as_interrupted(store, committed=2)
    before = tree_bytes(store)
    other = shutil.copytree(tiny_teacher, tmp_path / "other")
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] + 1e-3}, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StoreMismatchError, match=r"teacher\.weights_sha256: store has '[0-9a-f]{64}', this run has"):
        capture(make_config(str(other), store, "topk", **SHAPE), progress=False)
    assert tree_bytes(store) == before  # nothing written
