"""Batch collation: per-sequence items with :class:`SparseTargets` become dense padded tensors.

Each item is ``{"seq_id": int, "input_ids": int64[T], "labels": int64[T], "targets": SparseTargets}``
with targets for the same ``T`` positions. :func:`collate` right-pads sequences to the batch's
longest ``T`` and lays every position's estimate ``t̂`` (see :meth:`SparseTargets.estimate`) into
``[B, T, U]`` arrays, ``U`` the batch's largest number of stored ids at one position. The scatter
is vectorised: one index computation for the whole batch, no Python loop per position.

Along ``U`` the head comes first (by descending teacher probability, as stored), then the sampled
ids (ascending). Padding entries have id 0, probability 0 and ``target_mask`` False.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TargetsError
from ..targets import SparseTargets

__all__ = ["collate"]


def collate(
    items: list[dict[str, Any]],
    *,
    pad_id: int = 0,
    ignore_index: int = -100,
    pin_memory: bool = False,
) -> dict[str, Any]:
    """Collate sequences with sparse teacher targets into one padded batch.

    Returns a dict with
        ``input_ids`` int64[B,T] (right-padded with ``pad_id``), ``labels`` int64[B,T]
        (``ignore_index`` on padding), ``attention_mask`` int64[B,T], ``seq_ids`` int64[B],
        ``target_ids`` int64[B,T,U], ``target_probs`` float32[B,T,U] (``t̂``, 0 on padding),
        ``target_mask`` bool[B,T,U], ``target_tail_mass`` float32[B,T] (exact mass outside the
        head for topk/hybrid, 0 for sample/full), ``target_head_size`` int (``k``; 0 for
        sample), ``target_method`` str and ``target_num_samples`` int.

    ``pin_memory=True`` pins the tensors when CUDA is available and is a no-op otherwise.
    Raises :class:`~logitcache.errors.TargetsError` when items disagree on method, head size or number
    of samples, or when an item's targets do not cover exactly its ``T`` positions.
    """
    if not items:
        raise TargetsError("collate needs at least one item; found an empty list")
    targets = [item["targets"] for item in items]
    method, head_size, num_samples = _batch_target_params(targets)
    lengths = [int(item["input_ids"].shape[0]) for item in items]
    b, t = len(items), max(lengths)

    input_ids = torch.full((b, t), pad_id, dtype=torch.int64)
    labels = torch.full((b, t), ignore_index, dtype=torch.int64)
    attention_mask = torch.zeros((b, t), dtype=torch.int64)
    tail_mass = torch.zeros((b, t), dtype=torch.float32)
    for row, (item, n, tg) in enumerate(zip(items, lengths, targets)):
        _check_item(item, n, tg, row)
        input_ids[row, :n] = item["input_ids"].to(torch.int64)
        labels[row, :n] = item["labels"].to(torch.int64)
        attention_mask[row, :n] = 1
        if method in ("topk", "hybrid"):
            tail_mass[row, :n] = tg.tail_mass.to(torch.float32)

    target_ids, target_probs, target_mask = _scatter_estimates(targets, b, t)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "seq_ids": torch.tensor([int(item["seq_id"]) for item in items], dtype=torch.int64),
        "target_ids": target_ids,
        "target_probs": target_probs,
        "target_mask": target_mask,
        "target_tail_mass": tail_mass,
        "target_head_size": head_size,
        "target_method": method,
        "target_num_samples": num_samples,
    }
    if pin_memory and torch.cuda.is_available():
        batch = {key: v.pin_memory() if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    return batch


def _batch_target_params(targets: list[SparseTargets]) -> tuple[str, int, int]:
    """``(method, head size, num_samples)`` shared by every item, or :class:`TargetsError`."""
    params = {(tg.method, int(tg.head_ids.shape[1]) if tg.has_head else 0, int(tg.num_samples)) for tg in targets}
    if len(params) != 1:
        found = ", ".join(f"(method={m!r}, k={k}, N={n})" for m, k, n in sorted(params))
        raise TargetsError(
            f"all items of a batch must share method, head size and number of samples; found {found}. "
            "Batch items from one store (one capture configuration) only."
        )
    return next(iter(params))


def _check_item(item: dict[str, Any], n: int, tg: SparseTargets, row: int) -> None:
    if int(item["labels"].shape[0]) != n or tg.num_positions != n:
        raise TargetsError(
            f"item {row} (seq_id {item.get('seq_id')!r}): input_ids has {n} positions, labels "
            f"{int(item['labels'].shape[0])}, targets {tg.num_positions}; expected all equal"
        )


def _scatter_estimates(
    targets: list[SparseTargets], b: int, t: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter each sequence's flat estimate into ``[B, T, U]`` ids, probs and mask.

    Entry ``e`` of sequence ``row`` at position ``pos`` (rank ``e - start(pos)`` there) goes to the
    flat cell ``(row * t + pos) * u + rank``: one ``repeat_interleave`` over all positions of the
    batch gives every index, and ``scatter_`` (much cheaper than ``index_put`` here) lays them out."""
    estimates = [tg.estimate() for tg in targets]
    counts = torch.cat([offsets[1:] - offsets[:-1] for offsets, _, _ in estimates])  # by (row, position)
    u = int(counts.max()) if counts.numel() else 0
    cells = torch.cat([torch.arange(tg.num_positions) + row * t for row, tg in enumerate(targets)])
    starts = torch.cumsum(counts, 0) - counts
    index = torch.repeat_interleave(cells * u - starts, counts) + torch.arange(int(counts.sum()))
    ids = torch.cat([ids for _, ids, _ in estimates]).to(torch.int64)
    probs = torch.cat([probs for _, _, probs in estimates]).to(torch.float32)
    target_ids = torch.zeros(b * t * u, dtype=torch.int64).scatter_(0, index, ids)
    target_probs = torch.zeros(b * t * u, dtype=torch.float32).scatter_(0, index, probs)
    target_mask = torch.zeros(b * t * u, dtype=torch.bool).scatter_(0, index, True)
    shape = (b, t, u)
    return target_ids.view(shape), target_probs.view(shape), target_mask.view(shape)
