"""The write side of a unit: encode its sequences' targets into container objects and a commit
record, and commit them through the store's exactly-once path. Used by capture (in-process and in
Ray workers) and by ``convert``."""

from __future__ import annotations

import numpy as np

from ..errors import TargetsError
from ..faults import fault_point
from ..targets import SparseTargets
from .commit import ShardRecord, commit_unit
from .encode_device import on_device, unit_streams
from .encoding import encode_row, row_labels
from .entropy import pack_unit
from .fs import StoreFS
from .generations import committed_counts
from .spec import ShardSpec
from .totals import totals_histogram
from .containers import get_container


def encode_unit(spec: ShardSpec, index: int, seq_ids: list[int], tokens: list, targets: list[SparseTargets],
                masks: list[np.ndarray] | None = None, finish: list[int] | None = None
                ) -> tuple[ShardRecord, list[tuple[str, bytes]]]:
    """Encode one unit's sequences into its container objects and their commit record. A masked
    spec (the ``documents`` layout) takes one train mask ``bool[L_i - 1]`` per row in ``masks`` and
    compact targets, and its record lists each row's token count (``lengths``, what a loader packs by
    without reading the unit); a packed one takes no masks and records no lengths. A generated spec takes
    one finish code per row in ``finish``, and its record counts the responses (``generation``, what
    ``inspect`` sums). Targets on an accelerator (a GPU capture) have their streams computed there
    (:mod:`logitcache.store.encode_device`), byte-identical to the CPU's."""
    if spec.masked and masks is None:
        raise TargetsError(f"unit {index}: the store's layout is documents, so every row needs a train mask; found "
                           "masks=None. Pass one bool[L - 1] per row.")
    if not spec.masked and masks is not None:
        raise TargetsError(f"unit {index}: the store's layout is packed (rows without masks); found {len(masks)} "
                           "train masks. Write masked rows to a documents store.")
    masks = [None] * len(tokens) if masks is None else masks
    if len(masks) != len(tokens):
        raise TargetsError(f"unit {index}: {len(masks)} train masks for {len(tokens)} rows; expected one per row")
    if spec.generated != (finish is not None) or (finish is not None and len(finish) != len(tokens)):
        raise TargetsError(f"unit {index}: {'no' if finish is None else len(finish)} finish codes for {len(tokens)} "
                           f"rows; a store of generated responses takes one per row, any other store none")
    codes = [None] * len(tokens) if finish is None else finish
    streams: list = [None] * len(tokens)  # None: encode_row computes each row's (numpy, on the CPU)
    if on_device(targets):  # the numeric work batched where the targets are; the CPU packs bytes and compresses
        labels = [row_labels(tok, t, m) for tok, t, m in zip(tokens, targets, masks, strict=True)]
        streams = unit_streams(spec.encoding, labels, targets)
        targets = [t.to("cpu") for t in targets]
    rows = [encode_row(spec.encoding, tok, t, m, f, s)
            for tok, t, m, f, s in zip(tokens, targets, masks, codes, streams, strict=True)]
    columns = [r.columns for r in rows]
    if spec.encoding.entropy == "ans":
        columns = pack_unit(spec, columns)
    objects = get_container(spec.format).encode_unit(spec, index, index * spec.sequences_per_shard, seq_ids, columns)
    record = ShardRecord.build(
        index, sequences=len(seq_ids), positions=sum(t.num_positions for t in targets),
        entries=int(sum(int(t.ids_per_position().sum()) for t in targets)), objects=objects,
        max_logprob_error=max((r.logprob_error for r in rows), default=0.0),
        max_prob_error=max((r.prob_error for r in rows), default=0.0), header_sha256=spec.header_sha256 or None,
        lengths=tuple(len(tok) for tok in tokens) if spec.masked else None, sample_totals=totals_histogram(targets),
        generation=None if finish is None else committed_counts(tokens, masks, finish))
    return record, objects


def encode_and_commit(spec: ShardSpec, index: int, seq_ids: list[int], tokens: list, targets: list[SparseTargets],
                      masks: list[np.ndarray] | None = None, finish: list[int] | None = None, *,
                      root: str) -> ShardRecord:
    """Encode a computed unit (``masks`` and ``targets``, on any device, as :func:`encode_unit` takes them)
    and commit it through the store's exactly-once path."""
    record, objects = encode_unit(spec, index, seq_ids, tokens, targets, masks, finish)
    commit_unit(StoreFS(root), record, objects)
    fault_point("after_commit")
    return record
