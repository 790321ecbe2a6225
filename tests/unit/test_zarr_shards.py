"""Zarr units read on the calling thread (logitcache/store/containers/zarr_shards.py) against zarr's own reading of the
same objects, and every kind of damage to a shard refused with its shard and inner chunk named."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from logitcache.errors import CorruptShardError
from logitcache.store.encoding import Encoding
from logitcache.store.spec import ShardSpec
from logitcache.testing.store_conformance import requires

pytestmark = requires("zarr", "zstandard", "google_crc32c")


def spec(compression: str, per_shard: int = 5, sequences: int = 12) -> ShardSpec:
    return ShardSpec(method="sample", encoding=Encoding(ids="packed", vocab_size=97), num_samples=8, format="zarr",
                     compression=compression, compression_level=3, sequences_per_shard=per_shard,
                     num_sequences=sequences)


def unit_rows(sp: ShardSpec, index: int, seed: int) -> tuple[list[int], list[dict[str, bytes]]]:
    """The unit's rows: random seq ids and byte columns of random sizes, empty ones among them."""
    rng = np.random.default_rng(seed)
    count = min(sp.sequences_per_shard, sp.num_sequences - index * sp.sequences_per_shard)
    ids = [int(v) for v in rng.integers(0, 2**63, count, dtype=np.uint64)]
    rows = [{c: rng.integers(0, 256, int(rng.choice([0, 1, 7, 300, 5000])), dtype=np.uint8).tobytes()
             for c in sp.columns()} for _ in range(count)]
    return ids, rows


def read_by_zarr(sp: ShardSpec, index: int, num_rows: int, objects: dict[str, bytes]):
    """The reference: the unit's objects opened as a zarr group in memory and read by zarr (its asyncio pipeline)."""
    from zarr.buffer import default_buffer_prototype

    from logitcache.store.containers.zarr import GROUP, _in_memory

    store: dict = {}
    arrays = _in_memory(sp, store)
    store.update({p[len(GROUP) + 1:]: default_buffer_prototype().buffer.from_bytes(d) for p, d in objects.items()})
    first = index * sp.sequences_per_shard
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (arrays["seq_id"][first:first + num_rows],
                {c: [bytes(v) for v in arrays[c][first:first + num_rows]] for c in sp.columns()})


def encoded(sp: ShardSpec, index: int, seed: int) -> tuple[list[int], list[dict[str, bytes]], dict[str, bytes]]:
    from logitcache.store.containers import get_container

    ids, rows = unit_rows(sp, index, seed)
    objects = dict(get_container("zarr").encode_unit(sp, index, index * sp.sequences_per_shard, ids, rows))
    return ids, rows, objects


def decoded(sp: ShardSpec, index: int, num_rows: int, objects: dict[str, bytes]):
    from logitcache.store.containers import get_container

    return get_container("zarr").decode_unit(sp, index, index * sp.sequences_per_shard, num_rows, objects)


@pytest.mark.parametrize("compression", ["zstd", "lz4", "none"])
def test_units_read_as_zarr_reads_them(compression):
    sp = spec(compression)
    for index in range(3):  # 5 + 5 + 2 rows: the last unit partial
        ids, rows, objects = encoded(sp, index, seed=index)
        got = decoded(sp, index, len(ids), objects)
        ref_ids, ref_columns = read_by_zarr(sp, index, len(ids), objects)
        assert got.seq_ids.dtype == np.uint64 and got.seq_ids.tolist() == ref_ids.tolist() == ids
        for c in sp.columns():
            values, off = got.columns[c]
            assert [values[off[r]:off[r + 1]].tobytes() for r in range(len(ids))] == ref_columns[c] \
                == [row[c] for row in rows], c


@pytest.mark.parametrize("compression, level", [("zstd", 3), ("zstd", 9), ("zstd", 19), ("none", 0), ("lz4", 0)])
@pytest.mark.parametrize("per_shard, sequences, planned", [(5, 12, 12), (5, 12, 15), (4, 3, 3), (1, 2, 2)])
def test_units_are_written_byte_for_byte_as_zarr_writes_them(compression, level, per_shard, sequences, planned):
    """Full units, a partial last one, rows fewer than the plan's (chunks left unwritten), empty and long rows."""
    from dataclasses import replace

    from logitcache.store.containers import get_container
    from logitcache.store.containers.zarr import encode_by_zarr

    sp = replace(spec(compression, per_shard, planned), compression_level=level)
    for index in range(-(-sequences // per_shard)):
        ids, rows = unit_rows(replace(sp, num_sequences=sequences), index, seed=10 * index + level)
        first = index * per_shard
        got = get_container("zarr").encode_unit(sp, index, first, ids, rows)
        assert got == encode_by_zarr(sp, first, ids, rows)
        assert decoded(sp, index, len(ids), dict(got)).seq_ids.tolist() == ids


def shard(chunks: list[bytes | None], longer: int = 0) -> bytes:
    """A sharding_indexed shard built by hand (index at the end, its crc32c after it): the layout the spec gives.
    ``longer``: the last chunk's index entry claims that many bytes more than it has."""
    import google_crc32c

    body, index = b"", []
    for chunk in chunks:
        index.append((2**64 - 1, 2**64 - 1) if chunk is None else (len(body), len(chunk)))
        body += chunk or b""
    index[-1] = (index[-1][0], index[-1][1] + longer)
    table = np.array(index, dtype="<u8").tobytes()
    return body + table + int(google_crc32c.value(table)).to_bytes(4, "little")


def vlen(item: bytes) -> bytes:
    return (1).to_bytes(4, "little") + len(item).to_bytes(4, "little") + item


def test_frames_without_their_size_and_missing_chunks_read_as_zarr_would():
    import zstandard

    from logitcache.store.containers import zarr_shards

    sized, unsized = zstandard.ZstdCompressor(), zstandard.ZstdCompressor(write_content_size=False)
    data = shard([sized.compress(vlen(b"abc")), unsized.compress(vlen(b"x" * 999)), None])
    assert zarr_shards.byte_rows(data, 3, 3, "zstd", "here") == [b"abc", b"x" * 999, b""]
    assert zarr_shards.byte_rows(data, 2, 3, "zstd", "here") == [b"abc", b"x" * 999]
    ids = np.arange(4, dtype="<u8") * 2**61
    assert zarr_shards.seq_ids(shard([unsized.compress(ids.tobytes())]), 3, 4, "zstd", "here").tolist() == \
        ids[:3].tolist()


def damaged(kind: str) -> bytes:
    import zstandard

    good = [zstandard.ZstdCompressor().compress(vlen(v)) for v in (b"abc", b"defg")]
    if kind == "crc":
        data = bytearray(shard(good))
        data[-1] ^= 1
        return bytes(data)
    return {"short": shard(good)[-20:],
            "bounds": shard(good, longer=1),
            "frame": shard([good[0], b"\x00" * len(good[1])]),
            "count": shard([good[0], zstandard.ZstdCompressor().compress(b"\x02" + vlen(b"xy")[1:])]),
            "length": shard([good[0], zstandard.ZstdCompressor().compress(vlen(b"xy") + b"!")])}[kind]


@pytest.mark.parametrize("kind, message", [
    ("crc", "shard index fails its crc32c"), ("short", "its shard index alone takes 36"),
    ("bounds", "inner chunk 1 spans bytes"), ("frame", "inner chunk 1 does not decompress"),
    ("count", "inner chunk 1 is not one vlen-bytes item"), ("length", "inner chunk 1 is not one vlen-bytes item")])
def test_a_damaged_shard_is_refused_naming_its_chunk(kind, message):
    from logitcache.store.containers import zarr_shards

    with pytest.raises(CorruptShardError, match=rf"^shard 3 \(here\):? .*{message}"):
        zarr_shards.byte_rows(damaged(kind), 2, 2, "zstd", "shard 3 (here)")


def test_wrong_id_bytes_and_damage_through_the_container_name_the_shard_object():
    sp = spec("zstd")
    ids, rows, objects = encoded(sp, 1, seed=4)
    path = "data.zarr/seq_id/c/1"
    import zstandard

    objects[path] = shard([zstandard.ZstdCompressor().compress(b"\x00" * 8 * 4)])  # 4 ids, 5 expected
    with pytest.raises(CorruptShardError, match=r"shard 1 \(data.zarr/seq_id/c/1\): its ids take 32 bytes; 40 "):
        decoded(sp, 1, len(ids), objects)
    column = f"data.zarr/{sp.columns()[0]}/c/1"
    objects = encoded(sp, 1, seed=4)[2]
    objects[column] = objects[column][:-1]
    with pytest.raises(CorruptShardError, match=rf"shard 1 \({column}\): its shard index fails its crc32c"):
        decoded(sp, 1, len(ids), objects)


def test_threads_reading_at_once_read_alike():
    sp = spec("zstd", per_shard=16, sequences=16)
    ids, rows, objects = encoded(sp, 0, seed=7)
    want = decoded(sp, 0, len(ids), objects).columns
    results, errors = [], []

    def read():
        try:
            for _ in range(20):
                results.append(decoded(sp, 0, len(ids), objects).columns)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 80
    for got in results:
        assert all(np.array_equal(got[c][0], want[c][0]) and np.array_equal(got[c][1], want[c][1]) for c in want)


def test_a_claim_of_more_rows_than_a_shard_holds_gives_the_rows_it_holds():
    """read_unit then refuses the unit by its row count ("holds 5 sequences; the manifest records 7")."""
    sp = spec("zstd")
    ids, rows, objects = encoded(sp, 0, seed=2)
    got = decoded(sp, 0, 7, objects)
    assert got.seq_ids.tolist() == ids and len(got) == 5 and all(off.size == 6 for _, off in got.columns.values())
