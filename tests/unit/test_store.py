"""Store layout independent of the container: identity checks, refusals, versions, the lock, inspect."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from logitcache.errors import StoreError, StoreLockedError, StoreMismatchError, StoreNotFoundError
from logitcache.store import inspect_store, read_manifest
from logitcache.store.fs import StoreFS
from logitcache.store.commit import begin_store
from logitcache.store.lock import StoreLock
from logitcache.store.manifest import ShardRecord
from logitcache.testing.store_conformance import make_header, make_rows, write_store

HEADER = make_header("topk", "arrow", sequences=2, per_shard=1, ids="packed")


def test_changed_config_is_refused_naming_the_field(tmp_path):
    fs = StoreFS(tmp_path / "store")
    begin_store(fs, HEADER, [], overwrite=False)
    sparsify = {**HEADER.identity["sparsify"], "k": 3}
    changed = dataclasses.replace(HEADER, identity={**HEADER.identity, "sparsify": sparsify})
    with pytest.raises(StoreMismatchError, match=r"identity\.sparsify\.k: store has 4, this run has 3"):
        begin_store(fs, changed, [], overwrite=False)
    assert begin_store(fs, changed, [], overwrite=True) == []


def test_non_store_directory_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty"):
        begin_store(StoreFS(tmp_path), HEADER, [], overwrite=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_unknown_version_and_missing_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="manifest.json is missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(dict(HEADER.to_dict(), format_version=99)))
    with pytest.raises(StoreError, match="format_version 99"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{garbled")
    with pytest.raises(StoreError, match="unreadable"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("field,value", [("sequences", -1), ("positions", "many"), ("entries", 2.5),
                                         ("objects", None)])
def test_malformed_unit_records_are_refused(field, value):
    record = {"index": 0, "sequences": 1, "positions": 3, "entries": 6, "objects": []}
    with pytest.raises(StoreError, match="record"):
        ShardRecord.from_dict(dict(record, **{field: value}))


def test_lock_refuses_live_owner_and_recovers_stale(tmp_path):
    with StoreLock(tmp_path):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            with StoreLock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()
    import socket
    import subprocess
    proc = subprocess.Popen(["true"])
    proc.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid}))
    with StoreLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("logprobs", ["float32", "q8"])
def test_inspect_reports_encoding_and_measured_error(tmp_path, logprobs):
    rows = make_rows("topk", 3, 6, seed=1)
    root = str(tmp_path / "s")
    write_store(root, make_header("topk", "arrow", sequences=3, per_shard=2, ids="packed", logprobs=logprobs,
                                       seq_len=6), rows)
    info = inspect_store(root)
    assert info["encoding"]["logprobs"] == logprobs and info["encoding"]["ids"] == "packed"
    assert info["positions"] == 18 and info["shards"] == 2
    assert (info["max_prob_error"] > 0) == (logprobs == "q8")
