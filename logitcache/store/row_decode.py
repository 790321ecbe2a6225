"""A row's columns decoded one row at a time (docs/format.md, "Encoding"): the reference decoder, the values
:mod:`logitcache.store.unit_decode` gives for a whole unit at once, and the path of units whose columns it does not
handle. :func:`decode_row` returns the targets in canonical order: the head by (−logp, id), the samples by id.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import CorruptShardError
from ..targets import SparseTargets
from .bits import unpack_fixed, unpack_gamma_split
from .encoding import Encoding, _decode_logprobs
from .planes import decode_labels, unsplit as _unsplit, view as _view
from .totals import TOTALS_COLUMN, check_decoded_sums, count_dtype as _count_dtype, decoded_totals

__all__ = ["decode_row", "row_mask"]


def row_mask(columns: dict[str, np.ndarray]) -> np.ndarray | None:
    """A decoded row's train mask ``bool[L - 1]``; None for a row without one (a packed row)."""
    if "train_mask" not in columns:
        return None
    num_positions = columns["tokens"].size // 4 - 1
    data = columns["train_mask"]
    if num_positions < 1 or data.size != math.ceil(num_positions / 8):
        raise CorruptShardError(f"train mask holds {data.size} bytes for a row of {columns['tokens'].size // 4} "
                                f"tokens; {math.ceil(max(num_positions, 0) / 8)} expected (one bit per position)")
    bits = np.unpackbits(data)
    if bits[num_positions:].any():
        raise CorruptShardError("train mask has bits set past the row's last position")
    return bits[:num_positions].astype(bool)


def decode_row(enc: Encoding, method: str, num_samples: int, k: int,
               columns: dict[str, np.ndarray]) -> tuple[np.ndarray, SparseTargets]:
    """``(tokens int32[L], targets)`` in canonical order: head by (−logp, id), samples by id. A row with
    a ``train_mask`` column has targets only at the positions it marks (:func:`row_mask`)."""
    tokens = _view(columns["tokens"], "<i4", columns["tokens"].size // 4).astype(np.int32)
    labels = tokens[1:].astype(np.int64)
    mask = row_mask(columns)
    if mask is not None:
        labels = labels[mask]
    num_positions = labels.size
    head = {}
    if "head_ids" in columns:
        flags = _flags(columns["head_label"], num_positions)
        rest_len = k - flags.astype(np.int64)
        rest_ids = _decode_ids(enc, columns["head_ids"], columns["head_id_bits"], rest_len)
        lp = _decode_logprobs(enc, columns["head_logprobs"], num_positions * k).reshape(num_positions, k)
        ids = _with_label_first(flags, labels, rest_ids, rest_len).reshape(num_positions, k)
        order = np.lexsort((ids, -lp), axis=1)
        head = dict(head_ids=torch.from_numpy(np.take_along_axis(ids, order, 1).astype(np.int32)),
                    head_logprobs=torch.from_numpy(np.take_along_axis(lp, order, 1)),
                    tail_mass=torch.from_numpy(_unsplit(columns["tail_mass"], enc.tail_dtype, num_positions)
                                               .astype(np.float32)))
    sample: dict[str, torch.Tensor] = {}
    if "sample_ids" in columns:
        flags = _flags(columns["sample_label"], num_positions)
        rest_len = _view(columns["sample_lengths"], _count_dtype(num_samples), num_positions).astype(np.int64)
        rest_ids = _decode_ids(enc, columns["sample_ids"], columns["sample_id_bits"], rest_len)
        rest_counts = _view(columns["sample_counts"], _count_dtype(num_samples), rest_ids.size).astype(np.int64) + 1
        lengths = rest_len + flags
        ids = _with_label_first(flags, labels, rest_ids, rest_len)
        seg = np.repeat(np.arange(num_positions), rest_len)
        totals = decoded_totals(columns, num_samples, num_positions)
        label_counts = totals - np.bincount(seg, weights=rest_counts, minlength=num_positions).astype(np.int64)
        counts = _with_label_first(flags, label_counts, rest_counts, rest_len)
        if np.any(counts < 1):
            raise CorruptShardError("decoded a sample count below 1")
        if TOTALS_COLUMN in columns:
            check_decoded_sums(counts, lengths, totals)
            sample[TOTALS_COLUMN] = torch.from_numpy(totals.astype(np.int32))
        pos = np.repeat(np.arange(num_positions, dtype=np.int64), lengths)
        order = np.argsort(pos * enc.vocab_size + ids, kind="stable")  # ascending ids within each position
        sample.update(sample_lengths=torch.from_numpy(lengths.astype(np.int32)),
                      sample_ids=torch.from_numpy(ids[order].astype(np.int32)),
                      sample_counts=torch.from_numpy(counts[order].astype(np.int32)))
        if "sample_weights" in columns:
            w = _unsplit(columns["sample_weights"], "<f4", ids.size)
            sample["sample_weights"] = torch.from_numpy(w[order].astype(np.float32))
    targets = SparseTargets(method=method, num_samples=num_samples if sample else 0, **head, **sample,
                            **decode_labels(columns, num_positions))
    return tokens, targets


def _flags(data: np.ndarray, num_positions: int) -> np.ndarray:
    if data.size != math.ceil(num_positions / 8):
        raise CorruptShardError(f"label flags hold {data.size} bytes; {math.ceil(num_positions / 8)} expected")
    return np.unpackbits(data)[:num_positions].astype(bool)


def _with_label_first(flags: np.ndarray, label_values: np.ndarray, rest: np.ndarray,
                      rest_len: np.ndarray) -> np.ndarray:
    """Per position: ``label_values[t]`` if flagged, then that position's ``rest`` entries."""
    lengths = rest_len + flags
    out = np.empty(int(lengths.sum()), dtype=rest.dtype)
    starts = np.cumsum(lengths) - lengths
    label_at = starts[flags]
    out[label_at] = label_values[flags]
    mask = np.ones(out.size, dtype=bool)
    mask[label_at] = False
    out[mask] = rest
    return out


def _decode_ids(enc: Encoding, symbols: np.ndarray, bits: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    count = int(lengths.sum())
    if enc.ids == "packed":
        ids = unpack_fixed(bits, count, enc.id_width)
    else:
        gaps = unpack_gamma_split(symbols, bits, count)
        csum = np.cumsum(gaps)
        starts = np.cumsum(lengths) - lengths
        base = np.where(starts > 0, csum[np.maximum(starts - 1, 0)] if count else 0, 0)
        ranks = csum - np.repeat(base, lengths)
        if count and ranks.max() >= enc.vocab_size:
            raise CorruptShardError(f"decoded rank {int(ranks.max())} outside the vocabulary of {enc.vocab_size}")
        ids = enc._unrank[ranks]
    if count and ids.max() >= enc.vocab_size:
        raise CorruptShardError(f"decoded id {int(ids.max())} outside the vocabulary of {enc.vocab_size}")
    return ids
