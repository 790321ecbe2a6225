"""Stores: directory layout and exactly-once commits (``layout``), shard codecs (``arrow``),
and read-side helpers (``reader``)."""

from .arrow import ShardSpec, decode_rows, encode_shard, read_shard_table
from .layout import FORMAT_VERSION, ShardRecord, StoreLock, read_manifest
from .reader import inspect_store, iter_sequences, open_hf_dataset, spec_from_manifest, verify_store

__all__ = [
    "FORMAT_VERSION",
    "ShardRecord",
    "ShardSpec",
    "StoreLock",
    "decode_rows",
    "encode_shard",
    "inspect_store",
    "iter_sequences",
    "open_hf_dataset",
    "read_manifest",
    "read_shard_table",
    "spec_from_manifest",
    "verify_store",
]
