"""Arrow units read straight from their IPC stream (logitcache/store/containers/arrow_ipc.py) against pyarrow's read of
the same bytes, on every shape the writer makes; any other stream is left to pyarrow (None), never misread."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import zstandard

from logitcache.errors import CorruptShardError
from logitcache.store.containers import arrow as A
from logitcache.store.containers.arrow_ipc import _buffer, _Other, unit_columns
from logitcache.store.encoding import Encoding
from logitcache.store.spec import ShardSpec


def spec(compression: str = "zstd", level: int = 9) -> ShardSpec:
    return ShardSpec(method="sample", encoding=Encoding(ids="packed", vocab_size=97), num_samples=8, format="arrow",
                     compression=compression, compression_level=level, sequences_per_shard=6, num_sequences=12)


def rows_of(sp: ShardSpec, count: int, seed: int, sizes=(0, 1, 7, 300, 5000)) -> tuple[list[int], list[dict]]:
    rng = np.random.default_rng(seed)
    ids = [int(v) for v in rng.integers(0, 2**64 - 1, count, dtype=np.uint64)]
    rows = [{c: rng.integers(0, 256, int(rng.choice(sizes)), dtype=np.uint8).tobytes() for c in sp.columns()}
            for _ in range(count)]
    return ids, rows


def stream(sp: ShardSpec, ids: list[int], rows: list[dict]) -> bytes:
    ((_, data),) = A.ArrowContainer().encode_unit(sp, 0, 0, ids, rows)
    return data


def by_pyarrow(sp: ShardSpec, data: bytes) -> tuple[np.ndarray, dict[str, list[bytes]]]:
    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    return table.column("seq_id").to_numpy(), {c: table.column(c).to_pylist() for c in sp.columns()}


def direct(sp: ShardSpec, data: bytes | memoryview):
    names = list(sp.columns())
    return unit_columns(data, A._schema_message(tuple(names)), names)


def as_rows(columns: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, list[bytes]]:
    return {c: [values[off[r]:off[r + 1]].tobytes() for r in range(off.size - 1)] for c, (values, off) in
            columns.items()}


@pytest.mark.parametrize("compression,level", [("zstd", 1), ("zstd", 9), ("zstd", 19), ("none", 0)])
@pytest.mark.parametrize("count,sizes", [(6, (0, 1, 7, 300, 5000)), (1, (0,)), (1, (5000,)), (3, (0, 0, 2)),
                                         (40, (0, 3))])
def test_read_directly_as_pyarrow_reads_it(compression, level, count, sizes):
    sp = spec(compression, level)
    ids, rows = rows_of(sp, count, seed=count + level, sizes=sizes)
    data = stream(sp, ids, rows)
    got = direct(sp, memoryview(data))
    assert got is not None, "the writer's own layout is read directly"
    want_ids, want = by_pyarrow(sp, data)
    assert got[0].dtype == np.uint64 and np.array_equal(got[0], want_ids) and got[0].tolist() == ids
    assert as_rows(got[1]) == want == {c: [r[c] for r in rows] for c in sp.columns()}
    assert all(off.dtype == np.int64 and values.dtype == np.uint8 for values, off in got[1].values())


def test_the_container_decodes_through_the_direct_read(monkeypatch):
    sp = spec()
    ids, rows = rows_of(sp, 6, seed=1)
    data = stream(sp, ids, rows)
    results = []
    monkeypatch.setattr(A, "unit_columns", lambda *a: results.append(unit_columns(*a)) or results[-1])
    direct_unit = A.ArrowContainer().decode_unit(sp, 0, 0, 6, {A.shard_path(0): data})
    monkeypatch.setattr(A, "unit_columns", lambda *a: None)  # the pyarrow read
    by_arrow = A.ArrowContainer().decode_unit(sp, 0, 0, 6, {A.shard_path(0): data})
    assert len(results) == 1 and results[0] is not None
    assert np.array_equal(direct_unit.seq_ids, by_arrow.seq_ids)
    for r in range(6):
        a, b = direct_unit.row(r), by_arrow.row(r)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def lz4_stream(sp: ShardSpec, ids, rows) -> bytes:
    return stream(spec("lz4"), ids, rows)


def two_batches(sp: ShardSpec, ids, rows) -> bytes:
    table = pa.ipc.open_stream(pa.py_buffer(stream(sp, ids, rows))).read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table, max_chunksize=2)
    return sink.getvalue().to_pybytes()


def with_nulls(sp: ShardSpec, ids, rows) -> bytes:
    arrays = [pa.array(np.asarray(ids, np.uint64))] + [pa.array([None] + [r[c] for r in rows[1:]], pa.binary())
                                                        for c in sp.columns()]
    table = pa.Table.from_arrays(arrays, schema=A.schema(sp))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def other_columns(sp: ShardSpec, ids, rows) -> bytes:
    other = ShardSpec(method="topk", encoding=Encoding(ids="packed", vocab_size=97), k=4, format="arrow",
                      compression="zstd", compression_level=3, sequences_per_shard=6, num_sequences=12)
    return stream(other, ids, rows_of(other, len(ids), seed=3)[1])


@pytest.mark.parametrize("make", [lz4_stream, two_batches, with_nulls, other_columns])
def test_other_streams_are_left_to_pyarrow(make):
    sp = spec()
    ids, rows = rows_of(sp, 6, seed=2)
    assert direct(sp, make(sp, ids, rows)) is None


def test_a_buffer_stored_as_it_is_in_a_compressed_body():
    """A compressed body may hold a buffer uncompressed (its length -1), as Arrow writers do where compression does
    not pay; a frame is checked against the length it declares."""
    payload = bytes(range(200))
    raw = np.int64(-1).astype("<i8").tobytes() + payload
    assert bytes(_buffer(memoryview(raw), 0, len(raw), True)) == payload
    frame = np.int64(200).astype("<i8").tobytes() + zstandard.ZstdCompressor().compress(payload)
    assert bytes(_buffer(memoryview(frame), 0, len(frame), True)) == payload
    lying = np.int64(150).astype("<i8").tobytes() + frame[8:]
    with pytest.raises((_Other, zstandard.ZstdError)):
        _buffer(memoryview(lying), 0, len(lying), True)
    assert bytes(_buffer(memoryview(payload), 10, 20, False)) == payload[10:30]  # an uncompressed body
    with pytest.raises(_Other):
        _buffer(memoryview(payload), 190, 20, False)  # past the body


@pytest.mark.parametrize("cut", [1, 9, 100, -200, -30, -9, -1])
def test_a_truncated_stream_is_not_misread(cut):
    sp = spec()
    ids, rows = rows_of(sp, 6, seed=5)
    data = stream(sp, ids, rows)
    short = data[:cut] if cut > 0 else data[:len(data) + cut]
    assert direct(sp, short) is None
    if cut < -8:  # short of the end-of-stream marker: the batch is cut, and the container says so
        with pytest.raises(CorruptShardError, match="not a readable Arrow IPC stream"):
            A.ArrowContainer().decode_unit(sp, 0, 0, 6, {A.shard_path(0): short})


def test_flipped_bytes_are_never_misread():
    """Each flipped byte of the stream is read as the intact rows, left to pyarrow, or (in a buffer's data) read as
    the damaged rows pyarrow reads too: never as rows that neither the writer nor pyarrow gives."""
    sp = spec(level=3)
    ids, rows = rows_of(sp, 4, seed=6, sizes=(0, 5, 40))
    data = bytearray(stream(sp, ids, rows))
    intact = {c: [r[c] for r in rows] for c in sp.columns()}
    left = 0
    for at in range(0, len(data), 3):
        data[at] ^= 0x5A
        got = direct(sp, bytes(data))
        if got is None:
            left += 1
        else:
            try:
                want_ids, want = by_pyarrow(sp, bytes(data))
            except (pa.ArrowInvalid, OSError):
                want_ids, want = np.asarray(ids, np.uint64), intact  # a byte pyarrow minds and this read does not
            assert np.array_equal(got[0], want_ids) and as_rows(got[1]) == want, at
        data[at] ^= 0x5A
    assert left > len(data) // 6  # most of the stream is metadata and zstd frames this read checks
