"""Padding-free packing: whole sequences best-fit into a token budget, each bin one row ``[1, total]``.

:func:`plan_bins` decides which sequences share a row: best-fit decreasing over their lengths, a pure
function of the lengths and the budget. :func:`pack` lays one bin's examples end to end in the layout
``transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` produces: ``input_ids``
and ``position_ids`` ``[1, total]`` with positions restarting at 0 per sequence, ``cu_seq_lens_q/k``
(int32 ``[n+1]``) and ``max_length_q/k`` — plus the sparse targets of every position, densified as
:func:`logitcache.train.collate.collate` does, so :func:`logitcache.train.losses.kd_loss` and the
chunked loss take the packed batch unchanged and average over its trained positions.

Labels keep this package's convention: ``labels[t]`` is the token that follows position ``t`` *in
the same sequence* (the dataset's ``labels = tokens[1:]``), and the losses score ``logits[t]``
against ``labels[t]`` and ``targets[t]`` without shifting. So no label crosses a boundary as it is;
``DataCollatorWithFlattening``'s ``-100`` at each sequence's first position exists because Hugging
Face models shift labels inside their own loss, and here it would drop each sequence's first
prediction. ``labels`` is ``-100`` exactly where an example's ``loss_mask`` is 0. Never hand
``labels`` to a Hugging Face model's forward; give it :func:`model_inputs`.

The model must see no ``attention_mask`` and no cache: transformers (5.x, sdpa/eager/flex) derives
the block-diagonal causal mask from ``position_ids`` only when ``attention_mask is None`` and no
``past_key_values`` exist, and a model whose config says ``use_cache=True`` builds a cache in its
forward even in training mode. Either way each sequence silently attends to the ones before it in
the row. :func:`model_inputs` passes ``use_cache=False`` and leaves the mask out.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError, TargetsError
from ..targets import SparseTargets
from .collate import dense_targets, item_layout

__all__ = ["PACKED_MODEL_KEYS", "model_inputs", "pack", "plan_bins", "student_inputs"]

# the keys of a packed batch a student's forward takes (flash-attention-2 reads cu_seq_lens/max_length;
# sdpa, eager and flex read position_ids and ignore the rest)
PACKED_MODEL_KEYS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def plan_bins(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Best-fit decreasing: indices of ``lengths`` grouped into bins of at most ``max_tokens`` tokens.

    Sequences are taken longest first (ties by index); each goes into the open bin with the least
    room that still holds it (ties: the bin opened first), else into a new bin. Bins come in the
    order they were opened, each listing its indices ascending. Every index appears exactly once.

    A sequence is never split, and one longer than ``max_tokens`` is refused with a
    :class:`~logitcache.errors.ConfigError` rather than placed alone: ``max_tokens`` is the memory
    bound the trainer was sized for, and a row over it would break that bound silently.
    """
    _check_lengths(lengths, max_tokens)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    room: list[tuple[int, int]] = []  # (tokens left, bin number) of the open bins, ascending
    bins: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(room, (n, -1))  # the least room >= n, lowest bin number among equals
        if at == len(room):
            left, b = max_tokens, len(bins)
            bins.append([])
        else:
            left, b = room.pop(at)
        bins[b].append(i)
        if left > n:  # a full bin is closed: every sequence has at least one token
            bisect.insort(room, (left - n, b))
    return [sorted(b) for b in bins]


def _check_lengths(lengths: Sequence[int], max_tokens: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"max_tokens must be an int >= 1 (the token budget of one packed row); found {max_tokens!r}")
    for i, n in enumerate(lengths):
        if int(n) < 1:
            raise ConfigError(f"sequence {i} has {n} tokens; expected at least 1 (an empty sequence has no "
                              "position to pack; leave it out)")
        if n > max_tokens:
            raise ConfigError(
                f"sequence {i} has {n} tokens, more than max_tokens={max_tokens}; packing never splits a "
                f"sequence. Raise max_tokens to at least {max(lengths)} (the longest sequence here), or capture "
                "with a seq_len of at most max_tokens."
            )


def pack(examples: Sequence[dict[str, Any]], *, ignore_index: int = -100) -> dict[str, Any]:
    """One padding-free batch from per-sequence examples, in the order given.

    Each example is a dataset item ``{"seq_id", "input_ids": int[T], "labels": int[T], "targets":
    SparseTargets}`` with an optional ``loss_mask`` (``bool``/0-1 ``[T]``, 1 where position ``t``
    trains; absent: every position trains). ``targets`` covers either all ``T`` positions or only the
    trained ones, in order (a store that keeps targets at trained positions only).

    Returns ``input_ids``, ``labels``, ``position_ids`` (int64 ``[1, total]``), ``cu_seq_lens_q`` and
    ``cu_seq_lens_k`` (int32 ``[n+1]``), ``max_length_q`` and ``max_length_k`` (int), ``seq_ids``
    (int64 ``[n]``) and the target keys of :func:`~logitcache.train.collate.collate` with ``B = 1,
    T = total`` (``target_mask`` False and ``target_probs`` 0 where no target is stored). There is
    no ``attention_mask`` (see the module docstring). Raises
    :class:`~logitcache.errors.TargetsError` naming the example on malformed input.
    """
    if not examples:
        raise TargetsError("pack needs at least one example; found an empty list")
    _check_target_params(examples)
    layouts = [item_layout(e, f"example {i} (seq_id {e.get('seq_id')!r})", ignore_index)
               for i, e in enumerate(examples)]
    lengths = [layout.length for layout in layouts]
    starts = [0, *itertools.accumulate(lengths)]
    total, longest = starts[-1], max(lengths)
    cu = torch.tensor(starts, dtype=torch.int32)
    batch = {
        "input_ids": torch.cat([layout.input_ids for layout in layouts])[None],
        "labels": torch.cat([layout.labels for layout in layouts])[None],
        "position_ids": torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths])[None],
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(), "max_length_q": longest, "max_length_k": longest,
        "seq_ids": torch.tensor([int(e["seq_id"]) for e in examples], dtype=torch.int64),
    }
    cells = torch.cat([layout.positions + start for layout, start in zip(layouts, starts)])
    return {**batch, **dense_targets([e["targets"] for e in examples], cells, (1, total))}


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The student forward's keyword arguments for a packed batch: :data:`PACKED_MODEL_KEYS`, moved to
    the model's device by the caller, and ``use_cache=False`` (no attention mask, on purpose)."""
    return {**{key: batch[key] for key in PACKED_MODEL_KEYS}, "use_cache": False}


def student_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The student forward's keyword arguments for either kind of batch: :func:`model_inputs` for a packed
    one (from :func:`pack`), ``input_ids`` and ``attention_mask`` for a padded one (from ``collate``)."""
    if "cu_seq_lens_q" in batch:
        return model_inputs(batch)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _check_target_params(examples: Sequence[dict[str, Any]]) -> None:
    """Every example's targets share method, head size and number of samples, or :class:`TargetsError`."""
    def params(tg: SparseTargets) -> tuple[str, int, int]:
        return tg.method, int(tg.head_ids.shape[1]) if tg.has_head else 0, int(tg.num_samples)

    first = params(examples[0]["targets"])
    for i, example in enumerate(examples):
        found = params(example["targets"])
        if found != first:
            raise TargetsError(
                f"example {i} (seq_id {example.get('seq_id')!r}) has targets (method, k, N) = {found}; example 0 "
                f"has {first}. Pack examples from one store (one capture configuration) only."
            )
