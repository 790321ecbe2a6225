"""`verify` covers what a reader relies on (docs/reliability.md, "Corruption"): every Zarr array's metadata
(the plain `zarr.open_group` reading of docs/format.md is the independent reference), each unit record's
binding to its store header (a unit copied in from another store with its manifest entry), and `inspect`
saying what it checked and exiting non-zero on what it found."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitcache.capture import capture
from logitcache.cli import main
from logitcache.errors import CorruptShardError, StoreError
from logitcache.store import inspect_store, read_manifest, verify_store
from logitcache.store.fs import StoreFS
from logitcache.store.manifest import HEADER_DIGEST, ShardRecord
from logitcache.store.reader import read_unit
from logitcache.store.spec import spec_from_manifest
from logitcache.testing.store_conformance import make_header, make_rows, write_store

from helpers import make_config

PER_SHARD = 2


def _store(root: Path, fmt: str = "arrow", seed: int = 0, corpus: str = "c") -> Path:
    header = make_header("hybrid", fmt, sequences=6, per_shard=PER_SHARD, seq_len=3)
    header = dataclasses.replace(header, corpus={"fingerprint": corpus})
    write_store(str(root), header, make_rows("hybrid", 6, 3, seed=seed))
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _zarr_reads(root: Path) -> list:
    """The documented plain-zarr reading of a store (docs/format.md): every array, every row."""
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open_group(str(root / "data.zarr"), mode="r")
        return [group[name][:].tolist() for name in sorted(group.array_keys())]


# ---- (a) Zarr metadata ----------------------------------------------------------------------------------------

def _set_shape(d: dict) -> None:
    d["shape"] = [3]


def _set_dtype(d: dict) -> None:
    d["data_type"] = "uint8"


def _drop_sharding(d: dict) -> None:
    d["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}]


DAMAGE = {
    "garbage": lambda raw: b"\x00garbage{",
    "not an object": lambda raw: b"[1, 2, 3]",
    "shape": _set_shape,
    "data_type": _set_dtype,
    "codecs": _drop_sharding,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_zarr_array_metadata_fails_verify_and_inspect(tmp_path, damage):
    pytest.importorskip("zarr")
    root = _store(tmp_path / "s", "zarr")
    healthy = _zarr_reads(root)
    assert verify_store(root).ok and not inspect_store(root)["problems"]
    meta = root / "data.zarr" / "tokens" / "zarr.json"
    edit = DAMAGE[damage]
    if damage in ("garbage", "not an object"):
        meta.write_bytes(edit(meta.read_bytes()))
    else:
        d = json.loads(meta.read_text())
        edit(d)
        meta.write_text(json.dumps(d))
    try:  # the reference: what plain zarr makes of it
        broken = _zarr_reads(root) != healthy
    except Exception:
        broken = True
    assert broken, "the damage should break plain zarr reading"
    problems = verify_store(root).problems
    assert len(problems) == 1 and "data.zarr/tokens/zarr.json" in problems[0], problems
    assert "Zarr v3 metadata" in problems[0] or damage in problems[0]
    assert inspect_store(root)["problems"] == problems


def test_missing_zarr_group_metadata_fails_verify(tmp_path):
    pytest.importorskip("zarr")
    root = _store(tmp_path / "s", "zarr")
    (root / "data.zarr" / "zarr.json").unlink()
    problems = verify_store(root).problems
    assert len(problems) == 1 and "data.zarr/zarr.json is missing" in problems[0]


def test_metadata_equal_after_zarr_parses_it_passes(tmp_path):
    """Whitespace and key order are not the promise; what zarr reads back is."""
    pytest.importorskip("zarr")
    root = _store(tmp_path / "s", "zarr")
    meta = root / "data.zarr" / "seq_id" / "zarr.json"
    meta.write_text(json.dumps(dict(reversed(list(json.loads(meta.read_text()).items())))))
    assert verify_store(root).ok


# ---- (b) unit records bound to the store header --------------------------------------------------------------

def _copy_unit(src: Path, dst: Path, index: int, as_index: int | None = None) -> None:
    """Copy unit ``index`` of ``src`` (its shard and its manifest entry) into ``dst`` as unit ``as_index``."""
    as_index = index if as_index is None else as_index
    entry = next(e for e in _manifest(src)["shards"] if e["index"] == index)
    entry = {**entry, "index": as_index,
             "objects": [{**o, "path": f"shards/{as_index:05d}.arrow"} for o in entry["objects"]]}
    shutil.copyfile(src / f"shards/{index:05d}.arrow", dst / f"shards/{as_index:05d}.arrow")
    manifest = _manifest(dst)
    manifest["shards"] = [entry if e["index"] == as_index else e for e in manifest["shards"]]
    _write_manifest(dst, manifest)


def test_binding_is_the_documented_digest(tmp_path):
    manifest = _manifest(_store(tmp_path / "s"))
    for entry in manifest["shards"]:
        text = ":".join([manifest[HEADER_DIGEST], str(entry["index"]), *(o["sha256"] for o in entry["objects"])])
        assert entry["binding"] == hashlib.sha256(text.encode()).hexdigest()


def test_a_unit_copied_in_from_another_store_fails_verify_and_checked_reads(tmp_path):
    ours, theirs = _store(tmp_path / "a"), _store(tmp_path / "b", seed=1, corpus="another corpus")
    _copy_unit(theirs, ours, 1)
    assert verify_store(theirs).ok
    problems = verify_store(ours).problems
    assert len(problems) == 1 and "shard 1: its record is bound to another store" in problems[0], problems
    assert inspect_store(ours)["problems"] == problems  # bindings need no unit read
    manifest = read_manifest(ours)
    spec = spec_from_manifest(manifest.header)
    with pytest.raises(CorruptShardError, match="bound to another store"):
        read_unit(StoreFS(ours), spec, manifest.shards[1])  # a reader that verifies
    read_unit(StoreFS(ours), spec, manifest.shards[1], check=False)  # one that does not, reads it


def test_a_unit_moved_to_another_index_fails_verify(tmp_path):
    root = _store(tmp_path / "s")
    _copy_unit(root, root, 0, as_index=1)
    problems = verify_store(root).problems
    assert any("shard 1: its record is bound to another store" in p for p in problems), problems


def test_stores_written_before_bindings_still_read_and_verify(tmp_path):
    root = _store(tmp_path / "s")
    manifest = _manifest(root)
    for entry in manifest["shards"]:
        del entry["binding"]
    _write_manifest(root, manifest)
    report = verify_store(root)
    assert report.ok and report.unbound == 3
    assert inspect_store(root)["unbound_shards"] == 3 and not inspect_store(root)["problems"]
    other = _store(tmp_path / "o", seed=1, corpus="another corpus")
    _copy_unit(other, root, 2)  # a bound record among unbound ones: bound to another header, so named
    assert any("shard 2" in p for p in verify_store(root).problems)


def test_an_unbound_record_in_a_bound_store_is_a_problem(tmp_path):
    root = _store(tmp_path / "s")
    manifest = _manifest(root)
    del manifest["shards"][1]["binding"]
    _write_manifest(root, manifest)
    problems = verify_store(root).problems
    assert len(problems) == 1 and "shards [1] carry no binding" in problems[0]


@pytest.mark.parametrize("bad", ["", "ABC", 7, "g" * 64])
def test_typed_manifest_accepts_the_optional_binding_and_checks_it(tmp_path, bad):
    entry = _manifest(_store(tmp_path / "s"))["shards"][0]
    assert ShardRecord.from_dict(entry).to_dict() == entry  # the new key round-trips
    del entry["binding"]
    assert ShardRecord.from_dict(entry).binding is None and "binding" not in ShardRecord.from_dict(entry).to_dict()
    with pytest.raises(StoreError, match=r"shard\.binding is .*; expected 64 lowercase hex digits"):
        ShardRecord.from_dict({**entry, "binding": bad})


def test_resume_recomputes_a_commit_record_of_another_store(tmp_path):
    """An incomplete store: a commit record copied from another store is not counted as committed."""
    from logitcache.store.commit import begin_store
    from logitcache.store.containers import get_container

    header = make_header("hybrid", "arrow", sequences=6, per_shard=PER_SHARD, seq_len=3)
    rows = make_rows("hybrid", 6, 3, seed=0)
    write_store(str(tmp_path / "a"), header, rows, finalize=False)
    other = dataclasses.replace(header, corpus={"fingerprint": "another corpus"})
    write_store(str(tmp_path / "b"), other, rows, finalize=False)
    shutil.copyfile(tmp_path / "b/commits/00001.json", tmp_path / "a/commits/00001.json")
    spec = spec_from_manifest(header)
    done = begin_store(StoreFS(tmp_path / "a"), header, get_container("arrow").static_objects(spec), overwrite=False)
    assert [r.index for r in done] == [0, 2]


# ---- (c) inspect says what it checked, and fails on what it found ---------------------------------------------

@pytest.fixture(scope="module")
def captured(tiny_teacher, tmp_path_factory) -> Path:
    """A real tiny-teacher capture (four units), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("captured") / "s"
    capture(make_config(tiny_teacher, out), progress=False)
    return out


def test_inspect_reports_damaged_units_and_exits_non_zero(captured, tmp_path):
    root = Path(shutil.copytree(captured, tmp_path / "s"))
    healthy = CliRunner().invoke(main, ["inspect", str(root)])
    assert healthy.exit_code == 0 and "checked          manifest fields" in healthy.output
    assert "no problem(s)" in healthy.output
    shard1, shard2 = root / "shards/00001.arrow", root / "shards/00002.arrow"
    shard1.write_bytes(shard1.read_bytes()[:-5])
    shard2.unlink()
    summary = inspect_store(root)
    assert len(summary["problems"]) == 2 and "not the objects' checksums" in summary["checked"]
    assert "shard 1: object" in summary["problems"][0] and "bytes; the manifest records" in summary["problems"][0]
    assert "shard 2: object" in summary["problems"][1] and "is missing" in summary["problems"][1]
    for args in (["inspect", str(root)], ["inspect", str(root), "--json"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "shard 2" in result.output and "run `logitcache verify" in result.output
    assert json.loads(CliRunner().invoke(main, ["inspect", str(root), "--json"]).stdout)["problems"] == \
        summary["problems"]


def test_inspect_does_not_read_checksums(tmp_path):
    """A same-size bit flip is verify's to find: inspect states it did not read the bytes."""
    root = _store(tmp_path / "s")
    shard = root / "shards/00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert not inspect_store(root)["problems"]
    assert not verify_store(root).ok
