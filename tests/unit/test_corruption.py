"""Damaged and hostile stores: `verify` names every bad shard and exits 1; the dataset raises naming
the shard, or with on_corrupt="skip" leaves it out and counts it; no wrong target is ever yielded."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from logitcache.capture import capture
from logitcache.cli import main
from logitcache.capture.config import CaptureConfig
from logitcache.train.dataset import CacheDataset, CacheView
from logitcache.errors import StoreError, StoreNotFoundError
from logitcache.store.manifest import HEADER_DIGEST, header_digest
from logitcache.store import verify_store
from logitcache.store.reader import iter_sequences
from helpers import HOSTILE_FIELDS

SEQ_LEN, PER_SHARD, SHARDS = 16, 3, 4


def config_for(teacher: str, out: Path, seed: int) -> CaptureConfig:
    return CaptureConfig().with_overrides({
        "teacher.model": teacher, "teacher.dtype": "float32", "corpus.seq_len": SEQ_LEN,
        "corpus.max_tokens": SEQ_LEN * PER_SHARD * SHARDS, "store.path": str(out),
        "store.sequences_per_shard": PER_SHARD, "sparsify.method": "hybrid", "sparsify.k": 4,
        "sparsify.samples": 10, "seed": seed})


@pytest.fixture(scope="module")
def stores(tiny_teacher, tmp_path_factory):
    """Two stores of the same corpus and layout, different seeds: A (the victim) and B (a donor)."""
    root = tmp_path_factory.mktemp("corrupt")
    for name, seed in (("A", 0), ("B", 1)):
        capture(config_for(tiny_teacher, root / name, seed), progress=False)
    return root / "A", root / "B"


@pytest.fixture(scope="module")
def reference(stores):
    return list(iter_sequences(stores[0]))


def damaged_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_verify(store: Path):
    result = CliRunner().invoke(main, ["verify", str(store)])
    assert isinstance(result.exception, SystemExit) or result.exception is None  # no traceback
    return result


def assert_items_equal(items, expected) -> None:
    assert [i["seq_id"] for i in items] == [r[0] for r in expected]
    for item, (_, tokens, targets) in zip(items, expected):
        assert item["input_ids"].tolist() == tokens[:-1].tolist()
        for name in ("head_ids", "head_logprobs", "tail_mass", "sample_ids", "sample_counts"):
            assert torch.equal(getattr(item["targets"], name), getattr(targets, name)), name


def assert_shard_refused_and_skipped(store: Path, shard: int, reference, match: str = "") -> None:
    """verify names the shard and exits 1; the dataset raises before any row of it, or skips exactly it."""
    report = verify_store(store)
    assert len(report.problems) == 1, report.problems
    assert re.search(rf"(shard|unit|entry) {shard}\b", report.problems[0]), report.problems
    assert match in report.problems[0]
    result = run_verify(store)
    assert result.exit_code == 1 and "1 problem(s)" in result.output
    seen = []
    with pytest.raises(StoreError, match=rf"(shard|unit|entry) {shard}\b"):
        for item in CacheDataset(store):
            seen.append(item)
    assert_items_equal(seen, reference[:shard * PER_SHARD])  # everything before the bad shard, nothing of it
    ds = CacheDataset(store, on_corrupt="skip")
    assert ds.skipped_shards == 1 and f"{shard}" in ds.corrupt_shards[0]
    kept = [r for i, r in enumerate(reference) if i // PER_SHARD != shard]
    assert_items_equal(list(ds), kept)
    assert len(CacheView(store, on_corrupt="skip")) == len(kept)


def flip_bit(path: Path, rng: random.Random) -> int:
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return offset


@pytest.mark.parametrize("trial", range(20))
def test_random_bit_flip_in_a_shard(stores, reference, tmp_path, trial):
    rng = random.Random(1000 + trial)
    shard = rng.randrange(SHARDS)
    store = damaged_copy(stores[0], tmp_path / "s")
    flip_bit(store / "shards" / f"{shard:05d}.arrow", rng)
    assert_shard_refused_and_skipped(store, shard, reference, "sha256")


@pytest.mark.parametrize("trial", range(5))
def test_truncated_shard(stores, reference, tmp_path, trial):
    rng = random.Random(2000 + trial)
    shard = rng.randrange(SHARDS)
    store = damaged_copy(stores[0], tmp_path / "s")
    path = store / "shards" / f"{shard:05d}.arrow"
    path.write_bytes(path.read_bytes()[:rng.randrange(path.stat().st_size)])
    assert_shard_refused_and_skipped(store, shard, reference, "bytes")


def test_deleted_shard(stores, reference, tmp_path):
    store = damaged_copy(stores[0], tmp_path / "s")
    (store / "shards" / "00002.arrow").unlink()
    assert_shard_refused_and_skipped(store, 2, reference, "missing")


def test_shard_copied_in_from_another_store(stores, reference, tmp_path):
    victim, donor = stores
    store = damaged_copy(victim, tmp_path / "s")
    shutil.copy(donor / "shards" / "00001.arrow", store / "shards" / "00001.arrow")  # same index, other seed
    assert_shard_refused_and_skipped(store, 1, reference)


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_shard_path_escaping_the_store(stores, reference, tmp_path, how):
    """Even when the file outside holds the right bytes, the manifest may not point outside the store."""
    store = damaged_copy(stores[0], tmp_path / "s")
    outside = tmp_path / "outside.arrow"
    shutil.copy(store / "shards" / "00001.arrow", outside)
    if how == "symlink":
        (store / "shards" / "00001.arrow").unlink()
        (store / "shards" / "00001.arrow").symlink_to(outside)
    else:
        edit_manifest(store, lambda m: m["shards"][1]["objects"][0].update(
            path="../outside.arrow" if how == "parent" else str(outside)))
    # a path other than the unit's own is refused before it is opened; a symlink out, when it is resolved
    assert_shard_refused_and_skipped(store, 1, reference, "outside the store" if how == "symlink" else "lists objects")


def edit_manifest(store: Path, change, *, forge_digest: bool = False) -> None:
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if forge_digest:  # a deliberate forgery that also fixes the header digest
        manifest[HEADER_DIGEST] = header_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_deleted_manifest(stores, tmp_path):
    store = damaged_copy(stores[0], tmp_path / "s")
    (store / "manifest.json").unlink()
    result = run_verify(store)
    assert result.exit_code == 1
    assert "manifest.json is missing" in result.output and "holds shards but no usable manifest" in result.output
    with pytest.raises(StoreNotFoundError, match="manifest.json is missing"):
        CacheDataset(store)


def test_garbled_manifest(stores, tmp_path):
    store = damaged_copy(stores[0], tmp_path / "s")
    text = (store / "manifest.json").read_text()
    (store / "manifest.json").write_text(text[:len(text) // 2])
    result = run_verify(store)
    assert result.exit_code == 1 and "unreadable" in result.output
    with pytest.raises(StoreError, match="manifest .* is unreadable"):
        CacheDataset(store, on_corrupt="skip")




@pytest.mark.parametrize("change, message", HOSTILE_FIELDS)
def test_hostile_manifest_field_is_refused_by_name(stores, tmp_path, change, message):
    store = damaged_copy(stores[0], tmp_path / "s")
    edit_manifest(store, change, forge_digest=True)
    result = run_verify(store)
    assert result.exit_code == 1 and message in result.output, result.output
    with pytest.raises(StoreError) as info:
        CacheDataset(store, on_corrupt="skip")
    assert message in str(info.value)


def test_edited_header_field_is_detected_by_the_digest(stores, tmp_path):
    """params.samples 10 -> 11 would silently rescale every count/N target: the header digest refuses it."""
    store = damaged_copy(stores[0], tmp_path / "s")
    edit_manifest(store, lambda m: m["params"].update(samples=11))
    result = run_verify(store)
    assert result.exit_code == 1 and "header_sha256" in result.output
    with pytest.raises(StoreError, match="a header field was changed"):
        CacheDataset(store)


@pytest.mark.parametrize("trial", range(20))
def test_random_bit_flip_in_the_manifest_is_detected_or_harmless(stores, reference, tmp_path, trial):
    """A flipped manifest bit is refused by verify and the dataset, or changes nothing a reader yields."""
    store = damaged_copy(stores[0], tmp_path / "s")
    flip_bit(store / "manifest.json", random.Random(3000 + trial))
    detected = run_verify(store).exit_code == 1
    if detected:
        with pytest.raises((StoreError, StoreNotFoundError)):
            list(CacheDataset(store))
    else:
        assert_items_equal(list(CacheDataset(store)), reference)


def in_progress_copy(src: Path, dst: Path) -> Path:
    """The store as a running capture shows it: manifest incomplete, one commit record per shard."""
    store = damaged_copy(src, dst)
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "commits").mkdir()
    for entry in manifest["shards"]:
        (store / "commits" / f"{entry['index']:05d}.json").write_text(json.dumps(entry))
    (store / "manifest.json").write_text(json.dumps(dict(manifest, complete=False, shards=[])))
    return store


def test_in_progress_store_reads_from_commit_records(stores, reference, tmp_path):
    store = in_progress_copy(stores[0], tmp_path / "s")
    assert verify_store(store).ok
    assert_items_equal(list(CacheDataset(store)), reference)


@pytest.mark.parametrize("damage, message", [
    ("{not json", "commit record at .*00001.json is unreadable"),
    (json.dumps({"index": 1}), r"00001.json: shard.sequences is missing"),
    (json.dumps({"index": 1, "sequences": 3, "positions": 48, "entries": 1,
                 "objects": [{"path": "shards/00001.arrow", "bytes": 2**60, "sha256": "0" * 64}]}),
     r"00001.json: shard.objects\[0\].bytes is 1152921504606846976"),
])
def test_damaged_commit_record_is_named(stores, tmp_path, damage, message):
    store = in_progress_copy(stores[0], tmp_path / "s")
    (store / "commits" / "00001.json").write_text(damage)
    result = run_verify(store)
    assert result.exit_code == 1
    with pytest.raises(StoreError, match=message):
        CacheDataset(store)
