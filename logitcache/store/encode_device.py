"""A unit's :class:`~logitcache.store.streams.RowStreams` as batched torch ops, where the targets are.

:func:`~logitcache.store.encoding.row_streams` (numpy, one row) is the reference; this computes the same
streams for all rows of a unit at once, on the device the targets are on (the teacher's GPU in a capture),
so that only small integer and float tensors come to the CPU, once per unit, and the CPU is left with
the byte columns and the container's zstd. Per part (head, sample):

- **label flags**: ``ids == label`` of the entry's position;
- **order**: per position the label first, then the other ids by rank (``rank-delta``) or id (``packed``),
  ties in their original order: one stable sort of ``[T, k]`` rows (head) or of a flat
  ``position · (V + 1) + key`` (samples), the key of a label being −1;
- **gaps** (``rank-delta``): each rank minus the previous other rank of its position (0 for the first);
- **gamma symbols**: bit lengths, exact through ``frexp`` of float64 (values below ``2**32``);
- **bits**: the mantissas (``rank-delta``) or ids (``packed``) packed MSB first into each row's own
  byte-aligned stream (:mod:`logitcache.store.bits`), as 32-bit words held in int64 (no shift reaches the
  sign bit) summed with ``index_add_`` (the fields are disjoint), then split into big-endian bytes.

Logprob codecs (``float16``, ``q8``) stay on the CPU (numpy), so their rounding is the reference's.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..targets import SparseTargets
from .encoding import Encoding
from .streams import HeadStreams, RowStreams, SampleStreams, check_id_range

_FAR = 1 << 62  # above any id: the neutral value of a minimum over a row's ids


def on_device(targets: list[SparseTargets]) -> bool:
    """Whether a unit's targets are on an accelerator, where :func:`unit_streams` computes their streams."""
    return any(t.head_ids is not None and t.head_ids.device.type != "cpu" or
               t.sample_ids is not None and t.sample_ids.device.type != "cpu" for t in targets)


def unit_streams(enc: Encoding, labels: list[np.ndarray], targets: list[SparseTargets]) -> list[RowStreams]:
    """The streams of a unit's rows (``labels``: each row's, :func:`~logitcache.store.encoding.row_labels`),
    byte for byte those of :func:`~logitcache.store.encoding.row_streams`; TargetsError for ids outside the
    vocabulary (the first such row)."""
    first = targets[0]
    part = first.head_ids if first.head_ids is not None else first.sample_ids
    device = part.device
    sizes = [t.num_positions for t in targets]
    rows = torch.repeat_interleave(torch.arange(len(targets), device=device), torch.tensor(sizes, device=device),
                                   output_size=sum(sizes))
    label = torch.from_numpy(np.concatenate(labels)).to(device)
    heads = samples = [None] * len(targets)
    if first.head_ids is not None:
        heads = _head_streams(enc, [t.head_ids for t in targets], [t.head_logprobs for t in targets], label, rows,
                              sizes)
    if first.sample_ids is not None:
        samples = _sample_streams(enc, targets, label, rows, sizes)
    return [RowStreams(h, s) for h, s in zip(heads, samples, strict=True)]


def _head_streams(enc: Encoding, ids: list[torch.Tensor], logprobs: list[torch.Tensor], label: torch.Tensor,
                  rows: torch.Tensor, sizes: list[int]) -> list[HeadStreams]:
    ids = torch.cat(ids).long()
    k = ids.shape[1]
    is_label = ids == label[:, None]
    _check_ranges(enc, ids.masked_fill(is_label, _FAR).amin(1), ids.masked_fill(is_label, -1).amax(1),
                  (~is_label).sum(1), rows, len(sizes))
    key, order = torch.sort(_key(enc, ids).masked_fill(is_label, -1), dim=1, stable=True)
    kept = key >= 0  # the other ids, per position by key
    prev = torch.cat([key.new_zeros(key.shape[0], 1), key[:, :-1].clamp(min=0)], 1)
    symbols, bits, _ = _id_streams(enc, key[kept], (key - prev)[kept], rows[:, None].expand(-1, k)[kept], len(sizes))
    flags = _split(is_label.any(1), sizes)
    lps = _split(torch.cat(logprobs).float().gather(1, order).reshape(-1), [k * n for n in sizes])
    return [HeadStreams(f, s, b, lp) for f, s, b, lp in zip(flags, symbols, bits, lps, strict=True)]


def _sample_streams(enc: Encoding, targets: list[SparseTargets], label: torch.Tensor, rows: torch.Tensor,
                    sizes: list[int]) -> list[SampleStreams]:
    ids = torch.cat([t.sample_ids for t in targets]).long()
    lengths = torch.cat([t.sample_lengths for t in targets]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths, output_size=ids.numel())
    is_label = ids == label[seg]
    rest = (~is_label).long()
    _check_ranges(enc, _per_position(ids.masked_fill(is_label, _FAR), seg, lengths.numel(), "amin", _FAR),
                  _per_position(ids.masked_fill(is_label, -1), seg, lengths.numel(), "amax", -1),
                  _per_position(rest, seg, lengths.numel(), "sum", 0), rows, len(sizes))
    key = _key(enc, ids).masked_fill(is_label, -1)
    # by position (seg is non-decreasing, and stays so), label first, then by key
    order = torch.sort(seg * (enc.vocab_size + 1) + key + 1, stable=True).indices
    key = key[order]
    kept = key >= 0
    same = torch.cat([seg.new_zeros(1, dtype=torch.bool), seg[1:] == seg[:-1]])
    prev = torch.where(same, torch.cat([key.new_zeros(1), key[:-1]]), 0).clamp(min=0)
    symbols, bits, per_row = _id_streams(enc, key[kept], (key - prev)[kept], rows[seg[kept]], len(sizes))
    flags = _split(_per_position(is_label.long(), seg, lengths.numel(), "sum", 0) > 0, sizes)
    counts = _split(torch.cat([t.sample_counts for t in targets]).long()[order][kept], per_row)
    weights = [None] * len(sizes)
    if targets[0].sample_weights is not None:
        weights = _split(torch.cat([t.sample_weights for t in targets]).float()[order],
                         [t.sample_ids.numel() for t in targets])
    return [SampleStreams(f, s, b, c, w) for f, s, b, c, w in zip(flags, symbols, bits, counts, weights, strict=True)]


def _per_position(values: torch.Tensor, seg: torch.Tensor, num_positions: int, reduce: str,
                  empty: int) -> torch.Tensor:
    """``reduce`` (``sum``, ``amin``, ``amax``) of each position's entries; ``empty`` where it has none."""
    out = torch.full((num_positions,), empty, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, seg, values, reduce, include_self=reduce == "sum")


def _check_ranges(enc: Encoding, lows: torch.Tensor, highs: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor,
                  num_rows: int) -> None:
    """TargetsError for the first row whose other ids (per position: min ``lows``, max ``highs``, ``counts``
    of them) leave the vocabulary, with that row's range (what the reference reports)."""
    lo, hi, n = torch.stack([_per_position(lows, rows, num_rows, "amin", _FAR),
                             _per_position(highs, rows, num_rows, "amax", -1),
                             _per_position(counts, rows, num_rows, "sum", 0)]).cpu().tolist()
    for lo_r, hi_r, n_r in zip(lo, hi, n, strict=True):
        check_id_range((lo_r, hi_r) if n_r else None, enc.vocab_size)


@lru_cache(maxsize=8)
def _rank_table(enc: Encoding, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(enc._rank).to(device)


def _key(enc: Encoding, ids: torch.Tensor) -> torch.Tensor:
    """What the id codec orders by: ranks (``rank-delta``) or ids (``packed``); ids outside the vocabulary,
    already refused, are clamped so no lookup leaves the table."""
    if enc.ids == "packed":
        return ids
    return _rank_table(enc, ids.device)[ids.clamp(0, enc.vocab_size - 1)]


def _id_streams(enc: Encoding, keys: torch.Tensor, gaps: torch.Tensor, rows: torch.Tensor,
                num_rows: int) -> tuple[list[bytes], list[bytes], list[int]]:
    """Per row ``(symbol bytes, bits, number)`` of its other ids (``keys`` in stored order, ``gaps`` their rank
    gaps, ``rows`` the row of each)."""
    per_row = _per_position(torch.ones_like(rows), rows, num_rows, "sum", 0).cpu().tolist()
    if enc.ids == "packed":
        return [b""] * num_rows, _pack_rows(keys, torch.full_like(keys, enc.id_width), rows, num_rows), per_row
    symbols = torch.frexp(gaps.double())[1].long()  # the bit length of each gap (0 for 0)
    bits = _pack_rows(gaps, (symbols - 1).clamp(min=0), rows, num_rows)
    return [s.tobytes() for s in _split(symbols.to(torch.uint8), per_row)], bits, per_row


def _pack_rows(values: torch.Tensor, widths: torch.Tensor, rows: torch.Tensor, num_rows: int) -> list[bytes]:
    """The low ``widths`` bits of each value (entries grouped by row, ``rows`` non-decreasing), MSB first,
    in one zero-padded byte stream per row: :func:`logitcache.store.bits._pack_variable` of each row."""
    row_bits = _per_position(widths, rows, num_rows, "sum", 0)
    row_bytes = (row_bits + 7) // 8
    # each entry's bit offset: within its row, plus the bytes of the rows before it
    offsets = torch.cumsum(widths, 0) - widths + (8 * (torch.cumsum(row_bytes, 0) - row_bytes)
                                                  - (torch.cumsum(row_bits, 0) - row_bits))[rows]
    sizes = row_bytes.cpu().tolist()
    words = torch.zeros(sum(sizes) // 4 + 2, dtype=torch.int64, device=values.device)
    v = values & ((1 << widths) - 1)
    word, end = offsets >> 5, (offsets & 31) + widths  # widths ≤ 32: a field ends in its word (≤ 32) or the next
    words.index_add_(0, word, torch.where(end <= 32, v << (32 - end).clamp(min=0), v >> (end - 32).clamp(min=0)))
    words.index_add_(0, word + 1, torch.where(end > 32, (v << (64 - end).clamp(max=31)) & 0xFFFFFFFF, 0))
    data = torch.stack([(words >> s) & 255 for s in (24, 16, 8, 0)], 1).to(torch.uint8).reshape(-1)[:sum(sizes)]
    return [b.tobytes() for b in _split(data, sizes)]


def _split(values: torch.Tensor, sizes: list[int]) -> list[np.ndarray]:
    """``values`` on the CPU (one transfer), cut into consecutive pieces of ``sizes``."""
    return np.split(values.cpu().numpy(), np.cumsum(sizes)[:-1])
