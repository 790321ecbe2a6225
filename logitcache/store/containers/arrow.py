"""Arrow container: one Arrow IPC stream per unit (``shards/NNNNN.arrow``).

Columns: ``seq_id uint64`` and one ``binary`` column per encoded row column
(:func:`logitcache.store.encoding.row_columns`); buffers compressed with zstd (or lz4) at the
configured level. Any Arrow reader can open a shard; decoding the byte columns needs
:mod:`logitcache.store.encoding` (docs/format.md).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from ...errors import CorruptShardError
from ..spec import ShardSpec
from ..units import UnitRows
from .arrow_ipc import unit_columns
from .base import Objects


# A unit's buffers (~25) are decompressed on the calling thread: Arrow's thread pool costs more CPU to hand them out
# than it saves, and on the benchmark VM more wall time too, on most units (docs/benchmarks.md, "Arrow's thread pool").
READ_OPTIONS = pa.ipc.IpcReadOptions(use_threads=False)


def shard_path(index: int) -> str:
    return f"shards/{index:05d}.arrow"


def schema(spec: ShardSpec) -> pa.Schema:
    return _schema(tuple(spec.columns()))


@functools.lru_cache(maxsize=64)
def _schema(columns: tuple[str, ...]) -> pa.Schema:
    return pa.schema([("seq_id", pa.uint64())] + [(c, pa.binary()) for c in columns])


@functools.lru_cache(maxsize=64)
def _schema_message(columns: tuple[str, ...]) -> bytes:
    """The schema message a unit's stream starts with (what the stream writer writes for these columns)."""
    return _schema(columns).serialize().to_pybytes()


class ArrowContainer:
    """The ``arrow`` store format (:class:`~logitcache.store.containers.base.Container`)."""

    def static_objects(self, spec: ShardSpec) -> Objects:
        return []

    def check_static(self, spec: ShardSpec, stored: Mapping[str, bytes | memoryview]) -> list[str]:
        return []  # no static objects

    def encode_unit(self, spec: ShardSpec, index: int, first_row: int, seq_ids: list[int],
                    rows: list[dict[str, bytes]]) -> Objects:
        """One unit as one Arrow IPC stream object."""
        sch = schema(spec)
        arrays = [pa.array(np.asarray(seq_ids, dtype=np.uint64))]
        arrays += [pa.array([r[c] for r in rows], type=pa.binary()) for c in spec.columns()]
        table = pa.Table.from_arrays(arrays, schema=sch)
        level = spec.compression_level if spec.compression == "zstd" else None
        codec = None if spec.compression == "none" else pa.Codec(spec.compression, compression_level=level)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, sch, options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
            writer.write_table(table)
        return [(shard_path(index), sink.getvalue().to_pybytes())]

    def unit_paths(self, spec: ShardSpec, index: int) -> list[str]:
        return [shard_path(index)]

    def decode_unit(self, spec: ShardSpec, index: int, first_row: int, num_rows: int,
                    objects: Mapping[str, bytes | memoryview]) -> UnitRows:
        path = shard_path(index)
        names = tuple(spec.columns())
        direct = unit_columns(objects[path], _schema_message(names), list(names))  # the layout written here
        if direct is not None:
            return UnitRows(*direct)
        try:  # anything else (another codec, a damaged stream): pyarrow reads it or says what is wrong
            table = pa.ipc.open_stream(pa.py_buffer(objects[path]), options=READ_OPTIONS).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorruptShardError(f"shard {index} ({path}) is not a readable Arrow IPC stream ({exc})") from exc
        if not table.schema.equals(schema(spec)):
            raise CorruptShardError(f"shard {index} ({path}) has columns {table.schema.names}; "
                                    f"the manifest promises {schema(spec).names}")
        columns = {}
        for name in spec.columns():
            col = table.column(name).combine_chunks()
            offsets = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset:col.offset + len(col) + 1]
            data = col.buffers()[2]
            values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
            columns[name] = (values, offsets.astype(np.int64))
        return UnitRows(table.column("seq_id").to_numpy(), columns, keepalive=table)
