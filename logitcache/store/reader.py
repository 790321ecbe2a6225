"""Read side of a store: read and check units, iterate, verify, inspect, open as a ``datasets.Dataset``."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..errors import CorruptShardError, StoreError
from ..targets import SparseTargets
from .row_decode import decode_row, row_mask
from .entropy import unpack_unit
from .fs import StoreFS
from .commit import MANIFEST, ShardRecord, as_fs, read_manifest, sha256_bytes
from .finish import row_finish
from .generations import check_counts, inspect_section
from .manifest import generation_settings
from .spec import ShardSpec, spec_from_manifest
from .totals import draws_summary
from .containers import get_container
from .units import UnitRows
from .unit_decode import decode_unit, handles

__all__ = ["decode_rows", "inspect_store", "iter_sequences", "open_hf_dataset", "read_unit", "spec_from_manifest",
           "verify_store"]


def object_path(record: ShardRecord, rel: str) -> str:
    """``rel`` if it names a place inside the store; refuses manifest paths that escape the root."""
    norm = posixpath.normpath(rel)
    if rel.startswith(("/", "\\")) or "://" in rel or norm == ".." or norm.startswith("../") or "\\" in rel:
        raise StoreError(f"manifest entry {record.index} points outside the store: {rel!r}; "
                         "expected a path under shards/ or data.zarr/")
    return norm


def read_unit(fs: StoreFS, spec: ShardSpec, record: ShardRecord, *, check: bool = True) -> UnitRows:
    """One unit's rows; with ``check`` every object's size and sha256 are verified first."""
    backend = get_container(spec.format)
    expected = backend.unit_paths(spec, record.index)
    listed = sorted(o.path for o in record.objects)
    if listed != sorted(expected):
        raise CorruptShardError(f"shard {record.index} lists objects {listed}; a {spec.format} unit has {expected}")
    objects, root = {}, None if fs.remote else fs.root.resolve()
    for obj in record.objects:
        rel = object_path(record, obj.path)
        if root is not None and not fs.local_path(rel).resolve().is_relative_to(root):  # a symlink out
            raise StoreError(f"manifest entry {record.index} points outside the store: {rel!r} resolves to "
                             f"{fs.local_path(rel).resolve()}; expected a path under shards/ or data.zarr/")
        try:
            data = fs.read(rel)
        except FileNotFoundError:
            raise CorruptShardError(f"shard {record.index}: object {fs.describe(rel)} is missing") from None
        if check:
            if len(data) != obj.bytes:
                raise CorruptShardError(f"shard {record.index}: object {fs.describe(rel)} has {len(data)} bytes; "
                                        f"the manifest records {obj.bytes}")
            digest = sha256_bytes(data)
            if digest != obj.sha256:
                raise CorruptShardError(f"shard {record.index}: object {fs.describe(rel)} has sha256 {digest[:16]}…; "
                                        f"the manifest records {obj.sha256[:16]}…")
        objects[obj.path] = data
    if check:
        check_binding(spec, record)
    first_row = record.index * spec.sequences_per_shard
    rows = backend.decode_unit(spec, record.index, first_row, record.sequences, objects)
    if len(rows) != record.sequences:
        raise CorruptShardError(f"shard {record.index} holds {len(rows)} sequences; the manifest records "
                                f"{record.sequences}")
    if spec.encoding.entropy == "ans":
        try:
            rows = unpack_unit(spec, rows)
        except CorruptShardError as exc:
            raise CorruptShardError(f"shard {record.index}: {exc}") from None
    return rows


def check_binding(spec: ShardSpec, record: ShardRecord) -> None:
    """Refuse a record bound to another store than the one ``spec`` was read from (unbound records pass)."""
    if record.binding is None or not spec.header_sha256:
        return
    expected = record.binding_for(spec.header_sha256)
    if record.binding != expected:
        raise CorruptShardError(f"shard {record.index}: its record is bound to another store (binding "
                                f"{record.binding[:16]}…; this store's header {spec.header_sha256[:16]}… gives "
                                f"{expected[:16]}…): the unit and its manifest entry were copied in from another "
                                "store or another unit index. Recapture the store (or restore the unit from a copy "
                                "of this store).")


Row = tuple[int, np.ndarray, SparseTargets]  # seq_id, tokens int32[L], targets
MaskedRow = tuple[int, np.ndarray, np.ndarray | None, SparseTargets]  # ... with the train mask (None: packed)


def decode_rows(spec: ShardSpec, rows: UnitRows, with_mask: bool = False) -> Iterator[Row | MaskedRow]:
    """``(seq_id, tokens, targets)`` per row, or with ``with_mask`` ``(seq_id, tokens, mask, targets)``
    (``mask`` bool[L - 1], None for a packed row; a masked row's targets cover its trained positions).

    The unit is decoded at once (:func:`~logitcache.store.unit_decode.decode_unit`, which checks every row before
    the first is given; its rows' arrays are views of the unit's) where it handles the columns, else row by row
    (``decode_row``); a damaged row raises :class:`CorruptShardError` naming it either way."""
    if handles(rows.columns):
        decoded = decode_unit(spec, rows)
        for r in range(len(decoded)):
            seq_id, tokens, mask, targets = decoded.row(r)
            yield (seq_id, tokens, mask, targets) if with_mask else (seq_id, tokens, targets)
        return
    for r in range(len(rows)):
        columns, seq_id = rows.row(r), int(rows.seq_ids[r])
        try:
            tokens, targets = decode_row(spec.encoding, spec.method, spec.num_samples, spec.k, columns)
        except CorruptShardError as exc:
            raise CorruptShardError(f"row {r} (seq_id {seq_id}): {exc}") from None
        yield (seq_id, tokens, row_mask(columns), targets) if with_mask else (seq_id, tokens, targets)


def iter_sequences(root: str | os.PathLike | StoreFS, *, check: bool = True, with_mask: bool = False
                   ) -> Iterator[Row | MaskedRow]:
    """Every committed sequence in unit order as ``(seq_id, tokens int32[L], targets)``, or with
    ``with_mask`` as ``(seq_id, tokens, mask, targets)`` (:func:`decode_rows`)."""
    fs = as_fs(root)
    manifest = read_manifest(fs)
    spec = spec_from_manifest(manifest.header)
    for record in manifest.shards:
        yield from decode_rows(spec, read_unit(fs, spec, record, check=check), with_mask)


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`: one line per problem; ``unbound``: records without a binding."""

    root: str
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    unbound: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def store_problems(fs: StoreFS, spec: ShardSpec, records: tuple[ShardRecord, ...]) -> list[str]:
    """What holds store-wide: the container's static objects are present and say what the manifest
    promises (e.g. every Zarr array's metadata); unit records are all bound, or all unbound (an old store)."""
    backend = get_container(spec.format)
    stored, problems = {}, []
    for rel, _ in backend.static_objects(spec):
        try:
            stored[rel] = fs.read(rel)
        except FileNotFoundError:
            problems.append(f"{fs.describe(rel)} is missing; readers of a {spec.format} store need it")
    problems += [fs.describe(line) for line in backend.check_static(spec, stored)]  # a line starts with its path
    unbound = [r.index for r in records if r.binding is None]
    if unbound and len(unbound) < len(records):
        problems.append(f"shards {unbound[:10]} carry no binding to this store while the others do: copied in from "
                        "a store written before bindings? Recapture those units (or the store).")
    return problems


def verify_store(root: str | os.PathLike | StoreFS) -> VerifyReport:
    """Check the whole store: :func:`store_problems`, and every recorded unit: binding, objects (present,
    sizes, checksums), decodable rows, counts, recorded row lengths and generation counts."""
    fs = as_fs(root)
    report = VerifyReport(root=fs.url)
    manifest = read_manifest(fs)
    spec = spec_from_manifest(manifest.header)
    records = manifest.shards
    report.shards = len(records)
    report.unbound = sum(r.binding is None for r in records)
    report.problems = store_problems(fs, spec, records)
    header_stops = len((generation_settings(manifest.header) or {}).get("stop", []))
    for record in records:
        try:
            rows = read_unit(fs, spec, record)
            try:
                decoded = list(decode_rows(spec, rows))
            except CorruptShardError as exc:
                raise CorruptShardError(f"shard {record.index}: {exc}") from None
            check_lengths(record, decoded)
            check_finish_codes(spec, header_stops, record, rows)
            check_counts(spec, header_stops, record, rows)
            targets = [t for _, _, t in decoded]
            positions = sum(t.num_positions for t in targets)  # a documents row's: its trained positions
            entries = sum(int(t.ids_per_position().sum()) for t in targets)
            if positions != record.positions or entries != record.entries:
                raise CorruptShardError(f"shard {record.index} holds {positions} positions and {entries} entries; "
                                        f"the manifest records {record.positions} and {record.entries}")
        except StoreError as exc:
            report.problems.append(str(exc))
    planned = manifest.header.plan.shards
    if manifest.complete and len(records) != planned:
        report.problems.append(f"manifest is marked complete with {len(records)} shards; the plan has {planned}")
    return report


def check_lengths(record: ShardRecord, rows: list[Row]) -> None:
    """Refuse a unit whose recorded row lengths (``record.lengths``, documents stores) are not its rows' token
    counts."""
    if record.lengths is None:
        return
    for r, ((seq_id, tokens, _), recorded) in enumerate(zip(rows, record.lengths)):
        if tokens.size != recorded:
            raise CorruptShardError(f"shard {record.index} row {r} (seq_id {seq_id}) holds {tokens.size} tokens; the "
                                    f"manifest records lengths[{r}] = {recorded}")


def check_finish_codes(spec: ShardSpec, stop_strings: int, record: ShardRecord, rows: UnitRows) -> None:
    """Refuse a generated unit whose finish codes name a stop string the settings do not list."""
    for r in range(len(rows)) if spec.generated else ():
        try:
            row_finish(rows.row(r), stop_strings)
        except CorruptShardError as exc:
            raise CorruptShardError(f"shard {record.index} row {r} (seq_id {int(rows.seq_ids[r])}): {exc}") from None


INSPECT_CHECKS = ("manifest fields and header digest; every recorded object present with the recorded size and "
                  "inside the store; unit bindings; container metadata (not the objects' checksums or rows: run "
                  "`logitcache verify` for those)")


def quick_problems(fs: StoreFS, spec: ShardSpec, records: tuple[ShardRecord, ...]) -> list[str]:
    """:data:`INSPECT_CHECKS`: what can be checked without reading the units' bytes."""
    problems = store_problems(fs, spec, records)
    for record in records:
        try:
            check_binding(spec, record)
            for obj in record.objects:
                rel = object_path(record, obj.path)
                size = fs.size(rel)
                if size is None:
                    raise CorruptShardError(f"shard {record.index}: object {fs.describe(rel)} is missing")
                if size != obj.bytes:
                    raise CorruptShardError(f"shard {record.index}: object {fs.describe(rel)} has {size} bytes; "
                                            f"the manifest records {obj.bytes}")
        except StoreError as exc:
            problems.append(str(exc))
    return problems


def inspect_store(root: str | os.PathLike | StoreFS) -> dict[str, Any]:
    """A summary of a store (what ``logitcache inspect --json`` prints), with the problems
    :func:`quick_problems` finds (``checked`` says what was checked)."""
    fs = as_fs(root)
    manifest = read_manifest(fs)
    header, records = manifest.header, manifest.shards
    spec = spec_from_manifest(header)
    problems = quick_problems(fs, spec, records)
    generation, unreadable = inspect_section(spec, generation_settings(header), records,
                                             lambda record: read_unit(fs, spec, record, check=False))
    positions = sum(r.positions for r in records)
    shard_bytes = sum(r.bytes for r in records)
    total_bytes = shard_bytes + (fs.size(MANIFEST) or 0)
    entries = sum(r.entries for r in records)
    store = header.store
    encoding = {k: v for k, v in store.encoding.to_manifest().items() if k != "vocab_order"}
    return {
        "path": fs.url,
        "format_version": header.format_version,
        "layout": header.layout or "packed",
        "store_format": store.format,
        "encoding": encoding,
        "compression": f"{store.compression}-{store.compression_level}",
        "method": header.method,
        "params": header.params,
        "seed": header.identity_seed,
        "teacher": header.teacher,
        "tokenizer_fingerprint": header.tokenizer.fingerprint,
        "corpus": header.corpus,
        "seq_len": header.seq_len,
        "sequences": sum(r.sequences for r in records),
        "positions": positions,
        "shards": len(records),
        "planned_shards": header.plan.shards,
        "bytes_on_disk": total_bytes,
        "bytes_per_position": shard_bytes / positions if positions else 0.0,
        "mean_ids_per_position": entries / positions if positions else 0.0,
        "max_logprob_error": max((r.max_logprob_error for r in records), default=0.0),
        "max_prob_error": max((r.max_prob_error for r in records), default=0.0),
        "complete": manifest.complete,
        "unbound_shards": sum(r.binding is None for r in records),
        "checked": INSPECT_CHECKS,
        "problems": problems + unreadable,
        **generation,
        **draws_summary(records),
    }


def _hf_rows(root: str, fingerprint: str) -> Iterator[dict[str, Any]]:
    for seq_id, tokens, mask, t in iter_sequences(root, with_mask=True):
        row: dict[str, Any] = {"seq_id": seq_id, "tokens": tokens.tolist()}
        if mask is not None:
            row["train_mask"] = mask.tolist()
        for name in ("head_ids", "head_logprobs", "tail_mass", "sample_lengths", "sample_ids", "sample_counts",
                     "sample_weights", "label_logprobs", "sample_totals"):
            value = getattr(t, name)
            if value is not None:
                row[name] = value.reshape(-1).tolist()
        yield row


def open_hf_dataset(root: str | os.PathLike, cache_dir: str | None = None):
    """The store as one ``datasets.Dataset`` of decoded rows (flat lists, docs/format.md).

    Rows are decoded once into an Arrow cache file (``cache_dir`` or the datasets cache).
    """
    import datasets

    records = read_manifest(root).shards
    if not records:
        raise StoreError(f"store {root} has no committed shards yet")
    fingerprint = "".join(r.sha256 for r in records)  # a recaptured store gets a new cache
    return datasets.Dataset.from_generator(_hf_rows, gen_kwargs={"root": str(root), "fingerprint": fingerprint},
                                           cache_dir=cache_dir)
