"""Zarr v3 container: one group ``data.zarr`` with an array per column, one Zarr shard per unit.

- ``seq_id``: ``uint64[num_sequences]``;
- each encoded row column (:func:`logitcache.store.encoding.row_columns`): a variable-length
  bytes array ``[num_sequences]``.

Every array uses the sharding codec with shard shape ``(sequences_per_shard,)`` and inner chunks
of one row (zstd or blosc-lz4 inside), so a unit is exactly one object per array
(``data.zarr/<column>/c/<unit>``) and one row can be fetched with a ranged read. The array
metadata is written when the store is created. A unit's shard objects are put together in memory
(:mod:`~logitcache.store.containers.zarr_shards`, the bytes zarr writes, without zarr's asyncio pipeline, which
is slow on one-row chunks; blosc shards by zarr itself), then written and checksummed through the store's
exactly-once commit path, so ``zarr.open_group(STORE/data.zarr)`` reads a finished store with plain zarr. A unit is
read back by ``zarr_shards`` too.

Note: zarr-python marks the variable-length bytes data type as not yet in the Zarr v3 spec
(its representation may change between zarr versions); the manifest records the zarr version.

Imported only through the registry (:mod:`logitcache.store.containers`), so Arrow users need no zarr.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping

import numpy as np
import zarr
from zarr.abc.buffer import Buffer
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.dtype import VariableLengthBytes

from ...errors import CorruptShardError
from ..spec import ShardSpec
from ..units import UnitRows, from_blobs
from . import zarr_shards as shards
from .base import Objects

GROUP = "data.zarr"
ALWAYS_WRITE = {"write_empty_chunks": True}  # a unit is every array's shard, even where it equals the fill value


def _compressors(spec: ShardSpec):
    if spec.compression == "zstd":
        return zarr.codecs.ZstdCodec(level=spec.compression_level)
    if spec.compression == "lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")
    return None


def _in_memory(spec: ShardSpec, objects: dict[str, Buffer]) -> dict[str, zarr.Array]:
    """The store's arrays, created in ``objects`` (zarr key -> buffer): zarr opens a plain dict as a
    ``MemoryStore`` over that very dict, so what it writes is read back from ``objects`` directly."""
    shards = (spec.sequences_per_shard,)
    n = max(spec.num_sequences, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open_group(objects, mode="w", zarr_format=3)
        arrays = {"seq_id": group.create_array("seq_id", shape=(n,), dtype="uint64", shards=shards, chunks=shards,
                                                compressors=_compressors(spec), fill_value=0,
                                                config=ALWAYS_WRITE)}
        for name in spec.columns():
            arrays[name] = group.create_array(name, shape=(n,), dtype=VariableLengthBytes(), shards=shards,
                                              chunks=(1,), compressors=_compressors(spec), fill_value=b"",
                                              config=ALWAYS_WRITE)
    return arrays


def shard_path(name: str, index: int) -> str:
    """Array ``name``'s shard of unit ``index`` (the store-relative object path)."""
    return f"{GROUP}/{name}/c/{index}"


def encode_by_zarr(spec: ShardSpec, first_row: int, seq_ids: list[int], rows: list[dict[str, bytes]]) -> Objects:
    """A unit's shard objects as zarr writes them (rows ``first_row`` on of every array, in memory): the blosc units,
    and the tests' reference for the shards :mod:`~logitcache.store.containers.zarr_shards` writes."""
    objects: dict[str, Buffer] = {}
    arrays = _in_memory(spec, objects)
    stop = first_row + len(seq_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arrays["seq_id"][first_row:stop] = np.asarray(seq_ids, dtype=np.uint64)
        for name in spec.columns():
            values = np.empty(len(rows), dtype=object)
            values[:] = [r[name] for r in rows]
            arrays[name][first_row:stop] = values
    return _as_objects(objects, metadata=False)


def _as_objects(objects: dict[str, Buffer], metadata: bool) -> Objects:
    return [(f"{GROUP}/{key}", buf.to_bytes()) for key, buf in sorted(objects.items())
            if key.endswith("zarr.json") == metadata]


def _normalized(raw: bytes | memoryview) -> dict:
    """Zarr v3 node metadata as zarr itself reads it back (defaults filled in, values canonical)."""
    d = json.loads(bytes(raw))
    if not isinstance(d, dict):
        raise CorruptShardError(f"a JSON {type(d).__name__}, not an object")  # reported by the caller with its path
    meta = ArrayV3Metadata if d.get("node_type") == "array" else GroupMetadata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return meta.from_dict(dict(d)).to_dict()


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _metadata_difference(expected: bytes, found: bytes | memoryview) -> str | None:
    """Where stored metadata ``found`` differs from ``expected`` (the first field), or None."""
    want = _normalized(expected)
    try:
        got = _normalized(found)
    except Exception as exc:  # zarr raises assorted errors on metadata it cannot read
        return (f"is not Zarr v3 metadata that zarr can read ({type(exc).__name__}: {_shown(str(exc))}; "
                f"starts {_shown(bytes(found[:60]))})")
    for key in [*want, *sorted(set(got) - set(want))]:
        if got.get(key) != want.get(key):
            return f"has {key} = {_shown(got.get(key))}; the manifest promises {_shown(want.get(key))}"
    return None


class ZarrContainer:
    """The ``zarr`` store format (:class:`~logitcache.store.containers.base.Container`)."""

    def static_objects(self, spec: ShardSpec) -> Objects:
        """The group and array metadata (``zarr.json`` files), written once when the store is created."""
        objects: dict[str, Buffer] = {}
        _in_memory(spec, objects)
        return _as_objects(objects, metadata=True)

    def check_static(self, spec: ShardSpec, stored: Mapping[str, bytes | memoryview]) -> list[str]:
        """Each stored ``zarr.json`` parsed by zarr and compared, field by field, with the metadata ``spec``
        gives (so a store that passes opens with plain ``zarr.open_group`` as docs/format.md says)."""
        problems = []
        for path, expected in self.static_objects(spec):
            problem = _metadata_difference(expected, stored[path]) if path in stored else None
            if problem:
                problems.append(f"{path} {problem}; plain zarr readers rely on it (docs/format.md). Restore it "
                                "from a copy of the store, or recapture")
        return problems

    def encode_unit(self, spec: ShardSpec, index: int, first_row: int, seq_ids: list[int],
                    rows: list[dict[str, bytes]]) -> Objects:
        """The unit's shard of every array: put together by :mod:`~logitcache.store.containers.zarr_shards` (the bytes
        zarr writes) where it writes the compression, else by zarr."""
        if shards.writes(spec.compression):
            level, per = spec.compression_level, spec.sequences_per_shard
            objects = [(shard_path("seq_id", index),
                        shards.seq_ids_shard(np.asarray(seq_ids, dtype=np.uint64), per, spec.compression, level))]
            objects += [(shard_path(name, index),
                         shards.byte_rows_shard([r[name] for r in rows], per, spec.compression, level))
                        for name in spec.columns()]
            return sorted(objects)
        return encode_by_zarr(spec, first_row, seq_ids, rows)

    def unit_paths(self, spec: ShardSpec, index: int) -> list[str]:
        return sorted(shard_path(name, index) for name in ["seq_id", *spec.columns()])

    def decode_unit(self, spec: ShardSpec, index: int, first_row: int, num_rows: int,
                    objects: Mapping[str, bytes | memoryview]) -> UnitRows:
        """The unit's rows from its shards, read by :mod:`~logitcache.store.containers.zarr_shards` (the layout the
        metadata promises, the numcodecs codecs zarr uses) rather than through zarr's asyncio pipeline."""
        shard_rows = spec.sequences_per_shard
        path = {name: shard_path(name, index) for name in ["seq_id", *spec.columns()]}
        seq_ids = shards.seq_ids(objects[path["seq_id"]], num_rows, shard_rows, spec.compression,
                                 f"shard {index} ({path['seq_id']})")
        blobs = {name: shards.byte_rows(objects[path[name]], num_rows, shard_rows, spec.compression,
                                        f"shard {index} ({path[name]})")
                 for name in spec.columns()}
        return from_blobs(seq_ids, blobs)
