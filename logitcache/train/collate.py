"""Batch collation: per-sequence items with :class:`SparseTargets` become dense padded tensors.

Each item is ``{"seq_id": int, "input_ids": int64[T], "labels": int64[T], "targets": SparseTargets}``
with an optional ``loss_mask`` (``bool``/0-1 ``[T]``, 1 where position ``t`` trains; absent: every
position trains). ``targets`` covers either all ``T`` positions or only the trained ones, in position
order (the *compact* targets of a ``documents`` store). :func:`collate` right-pads sequences to the
batch's longest ``T`` and lays every stored position's estimate ``t̂`` (see
:meth:`SparseTargets.estimate`) into ``[B, T, U]`` arrays at that position, ``U`` the batch's largest
number of stored ids at one position. Labels are ``ignore_index`` wherever ``loss_mask`` is 0 and on
padding, so every loss averages over trained positions only. The layout is vectorised: one estimate
over the whole batch's entries and one compiled pass that writes the arrays, no Python loop per position.

Along ``U`` the head comes first (by descending teacher probability, as stored), then the sampled
ids (ascending). Padding entries, and every entry of a position without targets, have id 0,
probability 0 and ``target_mask`` False.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import TargetsError
from ..targets import SparseTargets
from .layout_jit import lay_out

__all__ = ["ItemLayout", "collate", "dense_targets", "item_layout", "one_buffer", "send_batches_by_name"]


class ItemLayout(NamedTuple):
    """One item's place in a batch: its length, its labels and where its stored targets sit."""

    length: int  # T
    input_ids: torch.Tensor  # int64[T]
    labels: torch.Tensor  # int64[T], ignore_index where the item's loss_mask is 0
    positions: torch.Tensor  # int64[P], the positions its targets cover (ascending; P = targets.num_positions)


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
        (``ignore_index`` on padding and where ``loss_mask`` is 0), ``attention_mask`` int64[B,T],
        ``seq_ids`` int64[B], ``target_ids`` int64[B,T,U], ``target_probs`` float32[B,T,U] (``t̂``,
        0 where nothing is stored), ``target_mask`` bool[B,T,U], ``target_tail_mass`` float32[B,T]
        (exact mass outside the head for topk/hybrid, 0 for sample/full and where nothing is stored),
        ``target_head_size`` int (``k``; 0 for sample), ``target_method`` str and ``target_num_samples`` int.

    The tensors are views of one buffer per dtype (:func:`one_buffer`: four buffers, so a batch from a DataLoader
    worker crosses as four shared-memory segments). Items with and without ``loss_mask`` may share a batch.
    ``pin_memory=True`` pins the tensors when CUDA is available and is a no-op otherwise. Raises
    :class:`~logitcache.errors.TargetsError` naming the item when items disagree on method, head size or number
    of samples, or when an item's targets cover neither all its ``T`` positions nor exactly its trained ones.
    """
    if not items:
        raise TargetsError("collate needs at least one item; found an empty list")
    layouts = [item_layout(item, f"item {row} (seq_id {item.get('seq_id')!r})", ignore_index)
               for row, item in enumerate(items)]
    b, t = len(items), max(layout.length for layout in layouts)

    input_ids, labels, attention_mask, seq_ids = one_buffer([((b, t), torch.int64)] * 3 + [((b,), torch.int64)])
    ids_np, labels_np = input_ids.numpy(), labels.numpy()
    real = np.arange(t) < np.array([layout.length for layout in layouts])[:, None]
    attention_mask.numpy()[:] = real
    ids_np.fill(pad_id)
    labels_np.fill(ignore_index)
    ids_np[real] = np.concatenate([layout.input_ids.numpy() for layout in layouts])
    labels_np[real] = np.concatenate([layout.labels.numpy() for layout in layouts])
    seq_ids.numpy()[:] = [int(item["seq_id"]) for item in items]
    cells = torch.from_numpy(np.concatenate([layout.positions.numpy() + row * t for row, layout in enumerate(layouts)]))
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "seq_ids": seq_ids,
        **dense_targets([item["targets"] for item in items], cells, (b, t)),
    }
    if pin_memory and torch.cuda.is_available():
        batch = {key: v.pin_memory() if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    return batch


def item_layout(item: dict[str, Any], where: str, ignore_index: int) -> ItemLayout:
    """The :class:`ItemLayout` of a dataset item, or a :class:`TargetsError` that starts with ``where``."""
    input_ids, labels = _int64(item["input_ids"]), _int64(item["labels"])
    n = int(input_ids.shape[0]) if input_ids.dim() == 1 else -1
    if n < 1 or labels.shape != input_ids.shape:
        raise TargetsError(f"{where}: input_ids has shape {tuple(input_ids.shape)} and labels "
                           f"{tuple(labels.shape)}; expected both 1-D of the same length >= 1")
    trained = _loss_mask(item, n, where)
    num_targets = item["targets"].num_positions
    if num_targets == n:
        positions = torch.arange(n)
    elif trained is not None and num_targets == int(trained.sum()):
        positions = trained.nonzero()[:, 0]
    else:
        also = "" if trained is None else f" or {int(trained.sum())} (the positions its loss_mask trains)"
        raise TargetsError(f"{where}: targets cover {num_targets} positions; expected {n} (every position){also}")
    labels = labels if trained is None else torch.where(trained, labels, ignore_index)
    return ItemLayout(n, input_ids, labels, positions)


def _int64(values: Any) -> torch.Tensor:
    """``values`` as an int64 tensor (the dataset's items already are one: returned as they are)."""
    if isinstance(values, torch.Tensor) and values.dtype == torch.int64:
        return values
    return torch.as_tensor(values).to(torch.int64)


def _loss_mask(item: dict[str, Any], n: int, where: str) -> torch.Tensor | None:
    """``bool[T]`` of the trained positions; None when the item has no ``loss_mask`` (every position trains)."""
    mask = item.get("loss_mask")
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.shape != (n,) or not ((mask == 0) | (mask == 1)).all():
        raise TargetsError(f"{where}: loss_mask has shape {tuple(mask.shape)} and values "
                           f"{sorted(set(mask.reshape(-1).tolist()))[:5]}; expected shape ({n},) of 0/1 or bool")
    return mask.to(torch.bool)


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


def dense_targets(targets: list[SparseTargets], cells: torch.Tensor, shape: tuple[int, int]) -> dict[str, Any]:
    """The target keys of a batch of ``shape = (B, T)`` positions, the stored positions at ``cells``.

    ``cells`` (int64, ascending) lists, in order, the flat (row-major) cell of every stored position of
    ``targets[0]``, then of ``targets[1]``, and so on. Returns ``target_ids``/``target_probs``/``target_mask``
    ``[B, T, U]``, ``target_tail_mass`` ``[B, T]`` and the shared ``target_head_size``,
    ``target_method`` and ``target_num_samples``; cells without a stored position are empty.

    The items' targets are joined end to end first, so :meth:`SparseTargets.estimate_parts` runs once for the
    batch (elementwise, so the same values as item by item); the entries of the cell ``c`` with ``n``
    of them fill ``[c, :n]``, its head first, then its sampled entries, as the estimate orders them (one
    compiled pass from the estimate's two parts, :func:`~logitcache.train.layout_jit.lay_out`).
    """
    method, head_size, num_samples = _batch_target_params(targets)
    at = cells.numpy()
    if at.size > 1 and not (at[1:] > at[:-1]).all():
        raise TargetsError("dense_targets takes the stored positions' cells in ascending order (item by item, "
                           "positions ascending); found them out of order")
    head_ids, head_probs, offsets, ids, probs = (None if v is None else v.numpy()
                                                 for v in _joined(targets).estimate_parts())
    counts = np.diff(offsets) + (0 if head_ids is None else head_ids.shape[1])  # per stored position
    u = int(counts.max()) if counts.size else 0
    size = shape[0] * shape[1]
    if at.size != counts.size or (at.size and not 0 <= int(at[0]) <= int(at[-1]) < size):
        raise TargetsError(f"dense_targets takes one cell in [0, {size}) per stored position ({counts.size}); "
                           f"found {at.size} cells")
    target_ids, target_probs, target_mask, tail_mass = one_buffer(
        [((size, u), torch.int64), ((size, u), torch.float32), ((size, u), torch.bool), ((size,), torch.float32)])
    tail_np = tail_mass.numpy()
    tail_np.fill(0)
    if method in ("topk", "hybrid"):
        tail_np[at] = torch.cat([tg.tail_mass for tg in targets]).to(torch.float32).numpy()  # any float dtype
    lay_out(head_ids, head_probs, offsets, ids, probs, at, target_ids.numpy(), target_probs.numpy(),
            target_mask.numpy())
    return {
        "target_ids": target_ids.view(*shape, u),
        "target_probs": target_probs.view(*shape, u),
        "target_mask": target_mask.view(*shape, u),
        "target_tail_mass": tail_mass.view(shape),
        "target_head_size": head_size,
        "target_method": method,
        "target_num_samples": num_samples,
    }


_TENSOR_FIELDS = [f for f in fields(SparseTargets) if f.name not in ("method", "num_samples")]


def one_buffer(parts: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """New tensors of these ``(shape, dtype)``, uninitialised, the parts of one dtype views of one buffer (each
    64-byte aligned): a batch made of them leaves a DataLoader worker as one shared-memory segment per dtype, which
    the training process maps once, instead of one segment (a socket round trip for its file descriptor) per tensor.
    One dtype per buffer, as ``torch.save`` refuses a storage viewed as two. Keeping one part keeps its buffer."""
    out: list[torch.Tensor | None] = [None] * len(parts)
    for dtype in dict.fromkeys(dtype for _, dtype in parts):
        align, places, end = max(1, 64 // dtype.itemsize), [], 0
        for i, (shape, d) in enumerate(parts):
            if d == dtype:
                n = math.prod(shape)
                places.append((i, end, n))
                end += -(-n // align) * align
        buffer = torch.empty(end, dtype=dtype)
        for i, start, n in places:
            out[i] = buffer[start:start + n].view(parts[i][0])
    return out


def send_batches_by_name(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker sends its batches by the ``file_system`` sharing strategy (a name
    per buffer instead of a file descriptor over a socket), which halves what receiving a batch costs the training
    process (docs/benchmarks.md, "What a training process fed by workers pays"). It is set in the worker only: the
    sender's strategy is what counts, and the training process's own is left as it is."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def _joined(targets: list[SparseTargets]) -> SparseTargets:
    """The batch's targets as one :class:`SparseTargets` over every item's positions, end to end. A field
    only some items carry is left out, except ``sample_weights``, which is 1 (exact) where an item has none."""
    first, parts = targets[0], {}
    for f in _TENSOR_FIELDS:
        values = [getattr(tg, f.name) for tg in targets]
        if f.name == "sample_weights" and any(v is not None for v in values):
            values = [torch.ones(tg.sample_ids.shape, dtype=torch.float32) if v is None else v
                      for v, tg in zip(values, targets)]
        if all(isinstance(v, torch.Tensor) for v in values):
            parts[f.name] = torch.cat(values)
    return SparseTargets(method=first.method, num_samples=first.num_samples, **parts)
