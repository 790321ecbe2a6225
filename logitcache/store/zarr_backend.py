"""Zarr v3 container: one group ``data.zarr`` with an array per column, one Zarr shard per unit.

- ``seq_id``: ``uint64[num_sequences]``;
- each encoded row column (:func:`logitcache.store.encoding.row_columns`): a variable-length
  bytes array ``[num_sequences]``.

Every array uses the sharding codec with shard shape ``(sequences_per_shard,)`` and inner chunks
of one row (zstd or blosc-lz4 inside), so a unit is exactly one object per array
(``data.zarr/<column>/c/<unit>``) and one row can be fetched with a ranged read. The array
metadata is written when the store is created. Shard objects are produced by zarr itself
(into memory) and then written and checksummed through the store's exactly-once commit path,
so ``zarr.open_group(STORE/data.zarr)`` reads a finished store with plain zarr.

Note: zarr-python marks the variable-length bytes data type as not yet in the Zarr v3 spec
(its representation may change between zarr versions); the manifest records the zarr version.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import CorruptShardError
from .spec import ShardSpec
from .units import UnitRows

GROUP = "data.zarr"
ALWAYS_WRITE = {"write_empty_chunks": True}  # a unit is every array's shard, even where it equals the fill value


def _codecs(spec: ShardSpec):
    import zarr

    if spec.compression == "zstd":
        return zarr.codecs.ZstdCodec(level=spec.compression_level)
    if spec.compression == "lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")
    return None


def _group(spec: ShardSpec, store):
    import zarr
    from zarr.core.dtype import VariableLengthBytes

    shards = (spec.sequences_per_shard,)
    n = max(spec.num_sequences, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open_group(store, mode="w", zarr_format=3)
        arrays = {"seq_id": group.create_array("seq_id", shape=(n,), dtype="uint64", shards=shards, chunks=shards,
                                                compressors=_codecs(spec), fill_value=0,
                                                config=ALWAYS_WRITE)}
        for name in spec.columns():
            arrays[name] = group.create_array(name, shape=(n,), dtype=VariableLengthBytes(), shards=shards,
                                              chunks=(1,), compressors=_codecs(spec), fill_value=b"",
                                              config=ALWAYS_WRITE)
    return arrays


def _memory(spec: ShardSpec):
    import zarr

    store = zarr.storage.MemoryStore()
    return store, _group(spec, store)


def _objects(store, metadata: bool) -> list[tuple[str, bytes]]:
    items = []
    for key, buf in sorted(store._store_dict.items()):
        if key.endswith("zarr.json") == metadata:
            items.append((f"{GROUP}/{key}", buf.to_bytes()))
    return items


def static_objects(spec: ShardSpec) -> list[tuple[str, bytes]]:
    """The group and array metadata (``zarr.json`` files), written once when the store is created."""
    store, _ = _memory(spec)
    return _objects(store, metadata=True)


def encode_unit(spec: ShardSpec, index: int, first_row: int, seq_ids: list[int],
                rows: list[dict[str, bytes]]) -> list[tuple[str, bytes]]:
    store, arrays = _memory(spec)
    stop = first_row + len(seq_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arrays["seq_id"][first_row:stop] = np.asarray(seq_ids, dtype=np.uint64)
        for name in spec.columns():
            values = np.empty(len(rows), dtype=object)
            values[:] = [r[name] for r in rows]
            arrays[name][first_row:stop] = values
    return _objects(store, metadata=False)


def unit_paths(spec: ShardSpec, index: int) -> list[str]:
    return sorted(f"{GROUP}/{name}/c/{index}" for name in ["seq_id", *spec.columns()])


def decode_unit(spec: ShardSpec, index: int, first_row: int, num_rows: int, objects: dict[str, bytes]) -> UnitRows:
    from zarr.core.buffer import default_buffer_prototype

    store, arrays = _memory(spec)
    proto = default_buffer_prototype()
    for path, data in objects.items():
        store._store_dict[path[len(GROUP) + 1:]] = proto.buffer.from_bytes(bytes(data))
    stop = first_row + num_rows
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seq_ids = np.asarray(arrays["seq_id"][first_row:stop], dtype=np.uint64)
            columns = {}
            for name in spec.columns():
                blobs = arrays[name][first_row:stop]
                lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
                columns[name] = (np.frombuffer(b"".join(blobs), dtype=np.uint8),
                                 np.concatenate([[0], np.cumsum(lengths)]))
    except Exception as exc:  # zarr raises assorted codec errors on damaged bytes
        raise CorruptShardError(f"shard {index} is not a readable Zarr shard ({type(exc).__name__}: {exc})") from exc
    return UnitRows(seq_ids, columns)
