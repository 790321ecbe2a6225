"""Read side of a store: inspect, verify, iterate, and open as a ``datasets.Dataset``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import CorruptShardError, StoreError
from ..targets import SparseTargets
from .arrow import ShardSpec, decode_rows, read_shard_table
from .layout import MANIFEST, ShardRecord, read_manifest, sha256_file


def spec_from_manifest(manifest: dict[str, Any]) -> ShardSpec:
    """The shard schema a manifest promises."""
    params = manifest["params"]
    return ShardSpec(
        method=manifest["method"],
        k=int(manifest.get("head_size", 0)),
        num_samples=int(params.get("samples", 0)),
        weighted=manifest["method"] == "sample" and float(params.get("temperature", 1.0)) != 1.0,
        logprob_dtype=manifest["store"]["logprob_dtype"],
        compression=manifest["store"]["compression"],
    )


def shard_records(manifest: dict[str, Any]) -> list[ShardRecord]:
    return [ShardRecord.from_dict(r) for r in manifest["shards"]]


def shard_path(root: Path, record: ShardRecord) -> Path:
    """The shard's path, refusing manifest paths that escape the store root."""
    path = (root / record.path).resolve()
    if not path.is_relative_to(root.resolve()):
        raise StoreError(f"manifest entry {record.index} points outside the store: {record.path!r}; "
                         "expected a path under shards/")
    return path


def iter_sequences(root: str | os.PathLike, *, check: bool = True) -> Iterator[tuple[int, np.ndarray, SparseTargets]]:
    """Every committed sequence in shard order as ``(seq_id, tokens, targets)``.

    With ``check`` each shard's checksum is verified before its rows are yielded.
    """
    root = Path(root)
    manifest = read_manifest(root)
    spec = spec_from_manifest(manifest)
    for record in shard_records(manifest):
        path = shard_path(root, record)
        if check:
            check_shard(path, record)
        yield from decode_rows(read_shard_table(str(path), spec), spec)


def check_shard(path: Path, record: ShardRecord) -> None:
    if not path.is_file():
        raise CorruptShardError(f"shard {record.index} is missing: {path}")
    size = path.stat().st_size
    if size != record.bytes:
        raise CorruptShardError(f"shard {record.index} ({path}) has {size} bytes; the manifest records {record.bytes}")
    digest = sha256_file(path)
    if digest != record.sha256:
        raise CorruptShardError(f"shard {record.index} ({path}) has sha256 {digest[:16]}…; "
                                f"the manifest records {record.sha256[:16]}…")


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`: one line per bad shard."""

    root: str
    shards: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(root: str | os.PathLike) -> VerifyReport:
    """Check every recorded shard: present, size, checksum, schema, rows and positions."""
    root = Path(root)
    report = VerifyReport(root=str(root))
    manifest = read_manifest(root)
    spec = spec_from_manifest(manifest)
    records = shard_records(manifest)
    report.shards = len(records)
    for record in records:
        try:
            path = shard_path(root, record)
            check_shard(path, record)
            table = read_shard_table(str(path), spec)
            offsets = table.column("tokens").combine_chunks().offsets.to_numpy()
            positions = int(offsets[-1] - offsets[0]) - table.num_rows
            if table.num_rows != record.sequences or positions != record.positions:
                raise CorruptShardError(f"shard {record.index} ({path}) holds {table.num_rows} sequences and "
                                        f"{positions} positions; the manifest records {record.sequences} and "
                                        f"{record.positions}")
        except StoreError as exc:
            report.problems.append(str(exc))
    if manifest.get("complete") and len(records) != manifest["plan"]["shards"]:
        report.problems.append(f"manifest is marked complete with {len(records)} shards; "
                               f"the plan has {manifest['plan']['shards']}")
    return report


def inspect_store(root: str | os.PathLike) -> dict[str, Any]:
    """A summary of a store (what ``logitcache inspect --json`` prints)."""
    root = Path(root)
    manifest = read_manifest(root)
    records = shard_records(manifest)
    positions = sum(r.positions for r in records)
    shard_bytes = sum(r.bytes for r in records)
    total_bytes = shard_bytes + (root / MANIFEST).stat().st_size
    entries = sum(r.entries for r in records)
    return {
        "path": str(root),
        "format_version": manifest["format_version"],
        "method": manifest["method"],
        "params": manifest["params"],
        "seed": manifest["identity"]["seed"],
        "teacher": manifest["teacher"],
        "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"],
        "corpus": manifest["corpus"],
        "seq_len": manifest["seq_len"],
        "sequences": sum(r.sequences for r in records),
        "positions": positions,
        "shards": len(records),
        "planned_shards": manifest["plan"]["shards"],
        "bytes_on_disk": total_bytes,
        "bytes_per_position": shard_bytes / positions if positions else 0.0,
        "mean_ids_per_position": entries / positions if positions else 0.0,
        "complete": bool(manifest.get("complete")),
    }


def open_hf_dataset(root: str | os.PathLike):
    """The store as one ``datasets.Dataset``, memory-mapping the shard files (no copy).

    Rows are sequences with the columns of docs/format.md. Equivalent to
    ``datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in shard_paths])``.
    """
    import datasets

    root = Path(root)
    manifest = read_manifest(root)
    parts = [datasets.Dataset.from_file(str(shard_path(root, r))) for r in shard_records(manifest)]
    if not parts:
        raise StoreError(f"store {root} has no committed shards yet")
    return datasets.concatenate_datasets(parts)
