"""The numeric part of a row's encoding, between the targets and the bytes (docs/format.md, "Encoding").

:func:`logitcache.store.encoding.encode_row` turns a row's targets into these streams (numpy, one row:
the reference) or takes them from :func:`logitcache.store.encode_device.unit_streams` (torch, a whole
unit at once, on the device the targets are on), then packs them into the row's byte columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TargetsError


@dataclass(frozen=True)
class HeadStreams:
    """One row's head in stored order: label flags, the other ids' gamma symbols and bits (or fixed-width
    bits), and every logprob (per position the label's first, then the others in the id codec's order)."""

    flags: np.ndarray  # bool[T]
    symbols: bytes
    bits: bytes
    logprobs: np.ndarray  # float32[T * k]


@dataclass(frozen=True)
class SampleStreams:
    """One row's sample part in stored order: label flags, the other ids' symbols and bits, their counts,
    and the weights (the label's first per position)."""

    flags: np.ndarray  # bool[T]
    symbols: bytes
    bits: bytes
    counts: np.ndarray  # int64, the other ids' counts
    weights: np.ndarray | None  # float32 per entry, or None


@dataclass(frozen=True)
class RowStreams:
    head: HeadStreams | None
    sample: SampleStreams | None


def check_id_range(id_range: tuple[int, int] | None, vocab_size: int) -> None:
    """TargetsError when ids to store, spanning ``id_range`` (min, max; None: no ids), leave the vocabulary."""
    if id_range is not None and (id_range[0] < 0 or id_range[1] >= vocab_size):
        raise TargetsError(f"token ids in [{id_range[0]}, {id_range[1]}] fall outside the vocabulary "
                           f"[0, {vocab_size}); expected every id below the store's vocab_size. Targets and "
                           "store must come from the same teacher vocabulary.")
