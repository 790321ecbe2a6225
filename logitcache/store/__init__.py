"""Stores: layout and exactly-once commits (``layout``), object I/O (``fs``), compact row encodings
(``encoding``), containers (``containers``: arrow, zarr) and the read side (``reader``)."""

from .encoding import Encoding
from .commit import read_manifest
from .lock import StoreLock
from .manifest import FORMAT_VERSION, ShardRecord
from .reader import inspect_store, iter_sequences, open_hf_dataset, read_unit, verify_store
from .spec import ShardSpec, spec_from_manifest

__all__ = [
    "FORMAT_VERSION",
    "Encoding",
    "ShardRecord",
    "ShardSpec",
    "StoreLock",
    "inspect_store",
    "iter_sequences",
    "open_hf_dataset",
    "read_manifest",
    "read_unit",
    "spec_from_manifest",
    "verify_store",
]
