"""Store layer: shard codec round trips, exactly-once commits, verify, identity checks, lock."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.manifest_check import with_header_digest
from logitcache.errors import CorruptShardError, StoreError, StoreLockedError, StoreMismatchError, \
    StoreNotFoundError
from logitcache.store import ShardSpec, decode_rows, encode_shard, read_manifest, read_shard_table, verify_store
from logitcache.store.layout import COMMIT_DIR, ShardRecord, StoreLock, begin_store, commit_unit, \
    finalize_store, sha256_file
from logitcache.store.reader import iter_sequences
from logitcache.targets import SparseTargets


def make_targets(method: str, t: int, k: int, n: int, rng: np.random.Generator, weighted=False) -> SparseTargets:
    fields = {}
    if method in ("topk", "hybrid", "full"):
        fields["head_ids"] = torch.from_numpy(rng.integers(0, 1000, size=(t, k), dtype=np.int32))
        fields["head_logprobs"] = torch.from_numpy(-rng.random((t, k), dtype=np.float32) * 10)
        fields["tail_mass"] = torch.from_numpy(rng.random(t, dtype=np.float32))
    if method in ("sample", "hybrid"):
        lengths = rng.integers(0 if method == "hybrid" else 1, 6, size=t).astype(np.int32)
        p = int(lengths.sum())
        fields["sample_lengths"] = torch.from_numpy(lengths)
        fields["sample_ids"] = torch.from_numpy(rng.integers(0, 1000, size=p, dtype=np.int32))
        fields["sample_counts"] = torch.from_numpy(rng.integers(1, n + 1, size=p).astype(np.int32))
        if weighted:
            fields["sample_weights"] = torch.from_numpy(rng.random(p, dtype=np.float32))
    return SparseTargets(method=method, num_samples=n if method in ("sample", "hybrid") else 0, **fields)


def assert_targets_equal(a: SparseTargets, b: SparseTargets) -> None:
    for name in ("head_ids", "head_logprobs", "tail_mass", "sample_lengths", "sample_ids", "sample_counts",
                 "sample_weights"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x.to(y.dtype), y), name
    assert a.method == b.method and a.num_samples == b.num_samples


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(["topk", "sample", "hybrid", "full"]), rows=st.integers(0, 4),
       t=st.integers(1, 9), k=st.integers(1, 5), n=st.sampled_from([1, 50, 255, 300]),
       weighted=st.booleans(), compression=st.sampled_from(["zstd", "lz4", "none"]), seed=st.integers(0, 99))
def test_shard_round_trip(tmp_path_factory, method, rows, t, k, n, weighted, compression, seed):
    rng = np.random.default_rng(seed)
    weighted = weighted and method == "sample"
    spec = ShardSpec(method=method, k=k, num_samples=n if method in ("sample", "hybrid") else 0,
                     weighted=weighted, compression=compression)
    seq_ids = [int(x) for x in rng.integers(0, 2**63, size=rows, dtype=np.uint64)]
    tokens = [rng.integers(0, 1000, size=t + 1, dtype=np.int32) for _ in range(rows)]
    targets = [make_targets(method, t, k, n, rng, weighted) for _ in range(rows)]
    path = tmp_path_factory.mktemp("rt") / "s.arrow"
    path.write_bytes(encode_shard(spec, seq_ids, tokens, targets))
    decoded = decode_rows(read_shard_table(str(path), spec), spec)
    assert len(decoded) == rows
    for (sid, tok, tgt), sid0, tok0, tgt0 in zip(decoded, seq_ids, tokens, targets):
        assert sid == sid0 and np.array_equal(tok, tok0)
        assert_targets_equal(tgt, tgt0)


def test_float16_logprobs_lose_only_fp16_precision(tmp_path):
    rng = np.random.default_rng(0)
    spec = ShardSpec(method="topk", k=4, logprob_dtype="float16")
    tgt = make_targets("topk", 7, 4, 0, rng)
    path = tmp_path / "s.arrow"
    path.write_bytes(encode_shard(spec, [1], [np.arange(8, dtype=np.int32)], [tgt]))
    (_, _, back), = decode_rows(read_shard_table(str(path), spec), spec)
    assert torch.allclose(back.head_logprobs, tgt.head_logprobs, rtol=1e-3, atol=1e-3)
    assert not torch.equal(back.head_logprobs, tgt.head_logprobs)


def test_schema_mismatch_is_named(tmp_path):
    rng = np.random.default_rng(0)
    spec = ShardSpec(method="topk", k=2)
    path = tmp_path / "s.arrow"
    path.write_bytes(encode_shard(spec, [1], [np.arange(4, dtype=np.int32)], [make_targets("topk", 3, 2, 0, rng)]))
    with pytest.raises(CorruptShardError, match="schema"):
        read_shard_table(str(path), ShardSpec(method="sample", num_samples=50))


HEADER = with_header_digest({"format": "logitcache", "format_version": 1, "identity": {"seed": 0, "sparsify": {"method": "topk", "k": 2}},
          "method": "topk", "params": {"k": 2}, "head_size": 2, "teacher": {"name": "t"},
          "tokenizer": {"fingerprint": "f"}, "corpus": {"fingerprint": "c"}, "seq_len": 3,
          "plan": {"sequences": 2, "positions": 6, "shards": 2, "sequences_per_shard": 1},
          "store": {"format": "arrow", "compression": "zstd", "logprob_dtype": "float32"}})


def write_unit(root, index, seed=0):
    rng = np.random.default_rng(seed + index)
    spec = ShardSpec(method="topk", k=2)
    data = encode_shard(spec, [index], [np.arange(4, dtype=np.int32)], [make_targets("topk", 3, 2, 0, rng)])
    import hashlib
    record = ShardRecord(index=index, path=f"shards/{index:05d}.arrow", sequences=1, positions=3, entries=6,
                         bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    commit_unit(root, record, data)
    return record


def test_commit_resume_finalize(tmp_path):
    root = tmp_path / "store"
    assert begin_store(root, HEADER, overwrite=False) == []
    r0 = write_unit(root, 0)
    # a reader during the capture sees only the committed unit
    assert [s["index"] for s in read_manifest(root)["shards"]] == [0]
    assert not read_manifest(root)["complete"]
    # a shard written but never recorded (crash between the renames) is not committed
    (root / "shards" / "00001.arrow").write_bytes(b"partial")
    assert begin_store(root, HEADER, overwrite=False) == [r0]
    r1 = write_unit(root, 1)
    finalize_store(root, HEADER, [r1, r0])
    manifest = read_manifest(root)
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1]
    assert not (root / COMMIT_DIR).exists()
    assert verify_store(root).ok
    assert [sid for sid, _, _ in iter_sequences(root)] == [0, 1]


def test_changed_config_is_refused_naming_the_field(tmp_path):
    root = tmp_path / "store"
    begin_store(root, HEADER, overwrite=False)
    changed = json.loads(json.dumps(HEADER))
    changed["identity"]["sparsify"]["k"] = 3
    with pytest.raises(StoreMismatchError, match=r"identity\.sparsify\.k: store has 2, this run has 3"):
        begin_store(root, changed, overwrite=False)
    assert begin_store(root, changed, overwrite=True) == []


def test_non_store_directory_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty"):
        begin_store(tmp_path, HEADER, overwrite=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "foreign"])
def test_verify_names_each_bad_shard(tmp_path, damage):
    root = tmp_path / "store"
    begin_store(root, HEADER, overwrite=False)
    records = [write_unit(root, 0), write_unit(root, 1)]
    finalize_store(root, HEADER, records)
    victim = root / "shards" / "00001.arrow"
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x40
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes((root / "shards" / "00000.arrow").read_bytes())
    report = verify_store(root)
    assert not report.ok and len(report.problems) == 1 and "shard 1" in report.problems[0]
    with pytest.raises(CorruptShardError, match="shard 1"):
        list(iter_sequences(root))


def test_unknown_version_and_missing_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="manifest.json is missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(dict(HEADER, format_version=99)))
    with pytest.raises(StoreError, match="format_version 99"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{garbled")
    with pytest.raises(StoreError, match="unreadable"):
        read_manifest(tmp_path)


def test_manifest_path_escaping_the_root_is_refused(tmp_path):
    root = tmp_path / "store"
    begin_store(root, HEADER, overwrite=False)
    record = write_unit(root, 0)
    evil = ShardRecord(**dict(record.to_dict(), path="../../etc/passwd"))
    finalize_store(root, HEADER, [evil])
    assert "outside the store" in verify_store(root).problems[0]


def test_lock_refuses_live_owner_and_recovers_stale(tmp_path):
    with StoreLock(tmp_path):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            with StoreLock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()
    # a lock left by a dead process on this host is taken over
    import socket
    import subprocess
    proc = subprocess.Popen(["true"])
    proc.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid}))
    with StoreLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_checksum_helper(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
