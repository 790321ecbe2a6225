"""The write side of a unit: encode its sequences' targets into container objects and a commit
record, and commit them through the store's exactly-once path. Used by capture (in-process and in
Ray workers) and by ``convert``."""

from __future__ import annotations

from ..faults import fault_point
from ..targets import SparseTargets
from .commit import ShardRecord, commit_unit
from .encoding import encode_row
from .entropy import pack_unit
from .fs import StoreFS
from .spec import ShardSpec
from .containers import get_container


def encode_unit(spec: ShardSpec, index: int, seq_ids: list[int], tokens: list, targets: list[SparseTargets]
                ) -> tuple[ShardRecord, list[tuple[str, bytes]]]:
    """Encode one unit's sequences into its container objects and their commit record."""
    rows = [encode_row(spec.encoding, tok, t) for tok, t in zip(tokens, targets)]
    columns = [r.columns for r in rows]
    if spec.encoding.entropy == "ans":
        columns = pack_unit(spec, columns)
    objects = get_container(spec.format).encode_unit(spec, index, index * spec.sequences_per_shard, seq_ids, columns)
    record = ShardRecord.build(
        index, sequences=len(seq_ids), positions=sum(t.num_positions for t in targets),
        entries=int(sum(int(t.ids_per_position().sum()) for t in targets)), objects=objects,
        max_logprob_error=max((r.logprob_error for r in rows), default=0.0),
        max_prob_error=max((r.prob_error for r in rows), default=0.0), header_sha256=spec.header_sha256 or None)
    return record, objects


def encode_and_commit(spec: ShardSpec, index: int, seq_ids: list[int], tokens: list, targets: list[SparseTargets],
                      *, root: str) -> ShardRecord:
    """Encode a computed unit and commit it through the store's exactly-once path (CPU only)."""
    record, objects = encode_unit(spec, index, seq_ids, tokens, targets)
    commit_unit(StoreFS(root), record, objects)
    fault_point("after_commit")
    return record
