"""Arrow IPC shard codec: one row per sequence, zero-copy views on read.

Columns (present by method; see docs/format.md):

=================  ======================  ==========================================
column             type                    length per row
=================  ======================  ==========================================
seq_id             uint64                  —
tokens             list<int32>             T + 1 (the window; inputs tokens[:-1], labels tokens[1:])
head_ids           list<int32>             T·k (row-major [T, k])         topk, hybrid, full
head_logprobs      list<float32|float16>   T·k                            topk, hybrid, full
tail_mass          list<float32>           T                              topk, hybrid, full
sample_lengths     list<uint16>            T                              sample, hybrid
sample_ids         list<int32>             Σ sample_lengths               sample, hybrid
sample_counts      list<uint8|uint16>      Σ sample_lengths               sample, hybrid
sample_weights     list<float32>           Σ sample_lengths               sample with τ ≠ 1
=================  ======================  ==========================================

Shards are written as Arrow IPC *streams* (the layout ``datasets.Dataset.from_file`` memory-maps)
with optional zstd/lz4 buffer compression.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ..errors import CorruptShardError
from ..targets import SparseTargets

EXTENSION = "arrow"


@dataclass(frozen=True)
class ShardSpec:
    """What fixes a shard's schema: the method, its head size and value encodings."""

    method: str
    k: int = 0
    num_samples: int = 0
    weighted: bool = False
    logprob_dtype: str = "float32"
    compression: str = "zstd"

    @property
    def has_head(self) -> bool:
        return self.method in ("topk", "hybrid", "full")

    @property
    def has_samples(self) -> bool:
        return self.method in ("sample", "hybrid")

    def count_type(self) -> pa.DataType:
        return pa.uint8() if self.num_samples <= 255 else pa.uint16()

    def schema(self) -> pa.Schema:
        cols = [("seq_id", pa.uint64()), ("tokens", pa.list_(pa.int32()))]
        if self.has_head:
            lp = pa.float16() if self.logprob_dtype == "float16" else pa.float32()
            cols += [("head_ids", pa.list_(pa.int32())), ("head_logprobs", pa.list_(lp)),
                     ("tail_mass", pa.list_(pa.float32()))]
        if self.has_samples:
            cols += [("sample_lengths", pa.list_(pa.uint16())), ("sample_ids", pa.list_(pa.int32())),
                     ("sample_counts", pa.list_(self.count_type()))]
            if self.weighted:
                cols.append(("sample_weights", pa.list_(pa.float32())))
        return pa.schema(cols)


def _np(t: torch.Tensor | None, dtype: str) -> np.ndarray:
    return t.detach().cpu().numpy().reshape(-1).astype(dtype, copy=False)


def _list_column(arrays: list[np.ndarray], type_: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_.value_type))


def encode_shard(spec: ShardSpec, seq_ids: list[int], tokens: list[np.ndarray],
                 targets: list[SparseTargets]) -> bytes:
    """Serialise one unit (several sequences) into Arrow IPC stream bytes."""
    schema = spec.schema()
    columns: dict[str, list[np.ndarray]] = {"tokens": [np.asarray(t, dtype=np.int32) for t in tokens]}
    lp_dtype = "float16" if spec.logprob_dtype == "float16" else "float32"
    count_dtype = "uint8" if spec.count_type() == pa.uint8() else "uint16"
    for name, dtype in (("head_ids", "int32"), ("head_logprobs", lp_dtype), ("tail_mass", "float32"),
                        ("sample_lengths", "uint16"), ("sample_ids", "int32"),
                        ("sample_counts", count_dtype), ("sample_weights", "float32")):
        if name in schema.names:
            columns[name] = [_np(getattr(t, name), dtype) for t in targets]
    arrays = [pa.array(np.asarray(seq_ids, dtype=np.uint64))]
    arrays += [_list_column(columns[f.name], f.type) for f in list(schema)[1:]]
    table = pa.Table.from_arrays(arrays, schema=schema)
    compression = None if spec.compression == "none" else spec.compression
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def read_shard_table(path: str, spec: ShardSpec | None = None) -> pa.Table:
    """Memory-map a shard; with ``spec``, check its schema matches what the manifest promises."""
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptShardError(f"shard {path} is not a readable Arrow IPC stream ({exc}). "
                                "Run `logitcache verify` and recapture the damaged unit.") from exc
    if spec is not None and not table.schema.equals(spec.schema()):
        raise CorruptShardError(f"shard {path} has schema {table.schema.to_string(show_schema_metadata=False)!r}; "
                                f"expected {spec.schema().to_string()!r} from the manifest")
    return table


def _values(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and int64 row offsets of a list column (zero-copy where Arrow allows)."""
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    return values, offsets


def decode_rows(table: pa.Table, spec: ShardSpec) -> list[tuple[int, np.ndarray, SparseTargets]]:
    """Rows of a shard table as ``(seq_id, tokens int32[T+1], SparseTargets)``."""
    seq_ids = table.column("seq_id").to_numpy()
    tok, tok_off = _values(table, "tokens")
    cols = {name: _values(table, name) for name in table.schema.names[2:]}
    rows = []
    for r in range(table.num_rows):
        def part(name: str, r: int = r) -> np.ndarray | None:
            if name not in cols:
                return None
            values, off = cols[name]
            return values[off[r]:off[r + 1]]

        tokens = tok[tok_off[r]:tok_off[r + 1]]
        rows.append((int(seq_ids[r]), tokens, targets_from_arrays(spec, part, len(tokens) - 1)))
    return rows


def targets_from_arrays(spec: ShardSpec, part, num_positions: int) -> SparseTargets:
    """Build SparseTargets from one row's flat column slices (``part(name) -> ndarray | None``)."""
    def tensor(name: str, dtype: torch.dtype) -> torch.Tensor | None:
        values = part(name)
        if values is None:
            return None
        with warnings.catch_warnings():  # read-only views of the memory-mapped shard: never written to
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)

    head_ids = tensor("head_ids", torch.int32)
    head_lp = tensor("head_logprobs", torch.float32)
    if head_ids is not None:
        head_ids = head_ids.reshape(num_positions, -1)
        head_lp = head_lp.reshape(num_positions, -1)
    return SparseTargets(
        method=spec.method,
        head_ids=head_ids,
        head_logprobs=head_lp,
        tail_mass=tensor("tail_mass", torch.float32),
        sample_lengths=tensor("sample_lengths", torch.int32),
        sample_ids=tensor("sample_ids", torch.int32),
        sample_counts=tensor("sample_counts", torch.int32),
        sample_weights=tensor("sample_weights", torch.float32),
        num_samples=spec.num_samples if spec.has_samples else 0,
    )
