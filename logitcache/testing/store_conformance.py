"""The store conformance contract: every (container × filesystem) pair subclasses StoreConformance.

A subclass whose name starts with ``Test`` (so pytest collects it) sets ``format`` (a name
registered with :func:`logitcache.store.containers.register_container`) and, for a filesystem
other than a local directory, ``make_root(tmp_path, name) -> str`` (a URL); a format other than
``arrow`` and ``zarr`` also overrides :meth:`StoreConformance.plain_seq_ids`. The tests here are
the whole contract: round trips (hypothesis), empty and ragged stores, resume after a crash
between a unit's objects and its commit record, readers seeing only committed units, corruption
of any object named, manifest paths that escape the root, and the format's own library reading
the store. Skip a subclass whose packages are missing with :func:`requires`::

    @requires("zarr")
    class TestZarrLocal(StoreConformance):
        format = "zarr"

This module is not a test module itself (pytest collects only its ``Test*`` subclasses).
"""

from __future__ import annotations

import copy
import importlib.util

import fsspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..errors import CorruptShardError
from ..store.commit import ShardRecord, begin_store, commit_unit, finalize_store, read_manifest
from ..store.containers import get_container
from ..store.encoding import Encoding, corpus_order
from ..store.fs import StoreFS
from ..store.manifest import ManifestHeader, PlanSection, StoreSection, TokenizerSection
from ..store.reader import iter_sequences, verify_store
from ..store.spec import spec_from_manifest
from ..store.writer import encode_unit
from .targets import assert_equal, canonical, random_row

VOCAB = 97


def requires(*modules: str) -> pytest.MarkDecorator:
    """Skip the marked test or class where one of ``modules`` (optional packages) is not installed."""
    missing = [m for m in modules if not _installed(m)]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}, not installed here")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package (``moto`` of ``moto.server``) is missing
        return False


def make_header(method: str, fmt: str, *, sequences: int, per_shard: int, k: int = 4, n: int = 50,
                weighted: bool = False, ids: str = "rank-delta", logprobs: str = "float32", order=(),
                seq_len: int = 1, entropy: str = "zstd") -> ManifestHeader:
    params = {"topk": {"k": k}, "sample": {"samples": n, "temperature": 0.5 if weighted else 1.0},
              "hybrid": {"k": k, "samples": n}, "full": {}}[method]
    head = {"topk": k, "hybrid": k, "full": VOCAB}.get(method, 0)
    enc = Encoding(ids=ids, logprobs=logprobs, vocab_size=VOCAB, order=tuple(order) if ids == "rank-delta" else (),
                   entropy=entropy)
    return ManifestHeader(
        identity={"seed": 0, "sparsify": {"method": method, **params}}, method=method, params=params, head_size=head,
        teacher={"name": "t"}, tokenizer=TokenizerSection("f"), corpus={"fingerprint": "c"}, seq_len=seq_len,
        plan=PlanSection(sequences=sequences, positions=0, shards=-(-sequences // per_shard),
                         sequences_per_shard=per_shard),
        store=StoreSection(format=fmt, compression="zstd", compression_level=3, encoding=enc))


def make_rows(method: str, sequences: int, t: int, seed: int, k: int = 4, weighted: bool = False):
    rows = [random_row(method, t, VOCAB, seed * 1000 + i, k=k, weighted=weighted) for i in range(sequences)]
    return [(((seed * 7919 + i) * 2**40 + i) % 2**64, tok, tgt) for i, (tok, tgt) in enumerate(rows)]


def write_store(root: str, header: ManifestHeader, rows: list, *, units=None,
                finalize: bool = True) -> list[ShardRecord]:
    fs = StoreFS(root)
    spec = spec_from_manifest(header)
    per = spec.sequences_per_shard
    begin_store(fs, header, get_container(spec.format).static_objects(spec), overwrite=False)
    records = []
    for index in (units if units is not None else range(-(-len(rows) // per))):
        part = rows[index * per:(index + 1) * per]
        record, objects = encode_unit(spec, index, [r[0] for r in part], [r[1] for r in part], [r[2] for r in part])
        commit_unit(fs, record, objects)
        records.append(record)
    if finalize:
        finalize_store(fs, header, records)
    return records


def all_objects(root: str) -> dict[str, bytes]:
    fs, base = fsspec.core.url_to_fs(root)
    return {p[len(base.rstrip("/")) + 1:]: fs.cat_file(p) for p in fs.find(base)}


class StoreConformance:
    """The contract; see the module docstring for what a subclass sets."""

    format = "arrow"
    entropy = "zstd"
    max_examples = 15

    def make_root(self, tmp_path, name: str) -> str:
        return str(tmp_path / name)

    def header(self, method, rows, per_shard, **kw):
        order = corpus_order(np.concatenate([r[1] for r in rows]), VOCAB) if rows else ()
        seq_len = len(rows[0][1]) - 1 if rows else 1
        return make_header(method, self.format, sequences=len(rows), per_shard=per_shard, order=order,
                           seq_len=seq_len, entropy=self.entropy, **kw)

    def test_round_trip(self, tmp_path_factory):
        @settings(max_examples=self.max_examples, deadline=None, suppress_health_check=list(HealthCheck))
        @given(method=st.sampled_from(["topk", "sample", "hybrid", "full"]), sequences=st.integers(1, 5),
               per_shard=st.integers(1, 3), t=st.integers(1, 12), ids=st.sampled_from(["rank-delta", "packed"]),
               weighted=st.booleans(), seed=st.integers(0, 10**6))
        def check(method, sequences, per_shard, t, ids, weighted, seed):
            weighted = weighted and method == "sample"
            rows = make_rows(method, sequences, t, seed, weighted=weighted)
            root = self.make_root(tmp_path_factory.mktemp("rt"), "store")
            write_store(root, self.header(method, rows, per_shard, ids=ids, weighted=weighted), rows)
            back = list(iter_sequences(root))
            assert [b[0] for b in back] == [r[0] for r in rows]
            for (_, tok, tgt), (_, tok0, tgt0) in zip(back, rows):
                assert np.array_equal(tok, tok0)
                assert_equal(tgt, canonical(tgt0))
            assert verify_store(root).ok
        check()

    def test_empty_store(self, tmp_path):
        root = self.make_root(tmp_path, "empty")
        write_store(root, self.header("sample", [], 4), [])
        assert list(iter_sequences(root)) == [] and verify_store(root).ok
        assert read_manifest(root).complete

    def test_ragged_units(self, tmp_path):
        rows = make_rows("hybrid", 7, 9, seed=5)  # a different number of sampled ids at every position
        root = self.make_root(tmp_path, "ragged")
        write_store(root, self.header("hybrid", rows, 3), rows)  # units of 3, 3 and 1 sequences
        back = list(iter_sequences(root))
        assert len(back) == 7
        for (_, _, tgt), (_, _, tgt0) in zip(back, rows):
            assert_equal(tgt, canonical(tgt0))

    def test_resume_after_a_crash_is_byte_identical(self, tmp_path):
        rows = make_rows("sample", 6, 8, seed=11)
        header = self.header("sample", rows, 2)
        reference = self.make_root(tmp_path, "ref")
        write_store(reference, header, rows)
        root = self.make_root(tmp_path, "crashed")
        records = write_store(root, header, rows, units=[0], finalize=False)
        fs = StoreFS(root)
        # unit 1's objects written, its commit record not: a crash between the two
        spec = spec_from_manifest(header)
        _, objects = encode_unit(spec, 1, [r[0] for r in rows[2:4]], [r[1] for r in rows[2:4]],
                                 [r[2] for r in rows[2:4]])
        fs.write(objects[0][0], objects[0][1][: len(objects[0][1]) // 2])
        # a reader now sees exactly the committed unit
        assert [s for s, _, _ in iter_sequences(root)] == [r[0] for r in rows[:2]]
        assert begin_store(fs, header, [], overwrite=False) == records
        more = []
        for index in (1, 2):
            part = rows[index * 2:(index + 1) * 2]
            record, objs = encode_unit(spec, index, [r[0] for r in part], [r[1] for r in part], [r[2] for r in part])
            commit_unit(fs, record, objs)
            more.append(record)
        finalize_store(fs, header, records + more)
        assert all_objects(root) == all_objects(reference)

    @pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "foreign"])
    def test_damage_to_any_object_is_named(self, tmp_path, damage):
        rows = make_rows("topk", 4, 6, seed=3)
        header = self.header("topk", rows, 2)
        root = self.make_root(tmp_path, "store")
        records = write_store(root, header, rows)
        other = self.make_root(tmp_path, "other")
        write_store(other, self.header("topk", make_rows("topk", 4, 6, seed=4), 2), make_rows("topk", 4, 6, seed=4))
        fs = StoreFS(root)
        for obj in records[1].objects:
            original = bytes(fs.read(obj.path))
            if damage == "flip":
                data = bytearray(original)
                data[len(data) // 2] ^= 0x40
                fs.write(obj.path, bytes(data))
            elif damage == "truncate":
                fs.write(obj.path, original[:-7])
            elif damage == "delete":
                fs.remove(obj.path)
            else:
                fs.write(obj.path, bytes(StoreFS(other).read(obj.path)))
            report = verify_store(root)
            assert not report.ok and len(report.problems) == 1 and "shard 1" in report.problems[0], report.problems
            with pytest.raises(CorruptShardError, match="shard 1"):
                list(iter_sequences(root))
            fs.write(obj.path, original)
            assert verify_store(root).ok

    def test_manifest_paths_escaping_the_root_are_refused(self, tmp_path):
        rows = make_rows("sample", 2, 5, seed=2)
        header = self.header("sample", rows, 2)
        root = self.make_root(tmp_path, "store")
        records = write_store(root, header, rows)
        evil = copy.deepcopy(records[0].to_dict())
        evil["objects"][0]["path"] = "../../etc/passwd"
        finalize_store(StoreFS(root), header, [ShardRecord.from_dict(evil)])
        problems = verify_store(root).problems
        assert len(problems) == 1 and "shard 0" in problems[0]
        assert "outside the store" in problems[0] or "lists objects" in problems[0]

    def plain_seq_ids(self, root: str) -> list[int]:
        """Every row's seq id as the container format's own library reads the store (no logitcache
        code involved); a subclass for another format overrides this."""
        fs, base = fsspec.core.url_to_fs(root)
        if self.format == "arrow":
            import pyarrow as pa

            return [s for path in sorted(fs.glob(f"{base}/shards/*.arrow"))
                    for s in pa.ipc.open_stream(fs.cat_file(path)).read_all().column("seq_id").to_pylist()]
        if self.format == "zarr":
            import zarr

            group = zarr.open_group(fsspec.get_mapper(f"{root}/data.zarr") if "://" in root else f"{root}/data.zarr",
                                    mode="r")
            return group["seq_id"][:].tolist()
        raise NotImplementedError(f"{type(self).__name__}: override plain_seq_ids for store format {self.format!r}")

    def test_plain_container_readers_can_open_it(self, tmp_path):
        rows = make_rows("sample", 3, 5, seed=9)
        root = self.make_root(tmp_path, "store")
        write_store(root, self.header("sample", rows, 2), rows)
        assert self.plain_seq_ids(root) == [r[0] for r in rows]
        assert torch.is_tensor(next(iter_sequences(root))[2].sample_ids)
