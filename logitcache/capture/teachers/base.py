"""The teacher protocol: what stage 2 ("teach") promises to the sparsifier.

A teacher turns a batch of token windows into next-token logits *on its own device*, one
chunk of one sequence at a time, so full-vocabulary logits for a whole batch never exist at
once and never leave the device. Results never depend on how windows were batched: the
output head is applied per sequence per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ...errors import TeacherError

BUCKET = 64
"""Sequences of different lengths are padded to the next multiple of this many tokens (see :func:`bucket_length`)."""

FINISH_REASONS = ("stop", "length", "stop-string")  # why a generated response ended


@dataclass(frozen=True)
class Generation:
    """One generated response: ``tokens int32[R]`` (``1 <= R <= max_new_tokens``) and why it ended:
    ``stop`` (its last token is a stop token, kept), ``stop-string`` (its text now holds ``stop[stop_string]``,
    kept) or ``length`` (``max_new_tokens`` reached)."""

    tokens: np.ndarray
    finish: str
    stop_string: int | None = None


@runtime_checkable
class Teacher(Protocol):
    """A loaded teacher language model.

    Attributes:
        name: what the user asked for (``embedded:...`` or the path given).
        vocab_size: rows of the output head, i.e. the width ``V`` of every logits chunk
            (may exceed ``len(tokenizer)`` when the head is padded).
        max_positions: the longest window the model accepts.
        tokenizer: the teacher's tokenizer (a ``transformers`` tokenizer).
        eos_id: the end-of-sequence token id.
    """

    name: str
    vocab_size: int
    max_positions: int
    tokenizer: Any
    eos_id: int

    def identity(self) -> dict[str, Any]:
        """``{"name", "backend", "dtype", "weights_sha256", "vocab_size"}`` for the manifest."""
        ...

    def forward_chunks(self, input_ids: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Logits of a batch, chunk by chunk.

        Args:
            input_ids: ``int64[B, L]`` token ids (any device; moved to the teacher's).
            chunk: positions per yielded chunk (the last chunk of a row may be shorter).

        Yields:
            ``(row, start, logits)`` in row-major order, where ``logits`` is ``[c, V]`` on the
            teacher's device, in the teacher's dtype, for positions ``start .. start + c`` of
            sequence ``row`` (the logits at position ``t`` predict token ``t + 1``). Chunks are
            computed under ``torch.inference_mode()``: read them or make new tensors from them
            (``.float()``, ``log_softmax``); modifying one in place needs ``inference_mode`` too.
        """
        ...

    def forward_sequences(self, sequences: Sequence[torch.Tensor], chunk: int
                          ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Logits of sequences of any lengths, chunk by chunk, each sequence seeing only itself.

        Args:
            sequences: ``int64[L_i]`` token ids per sequence (any device), ``1 <= L_i <= max_positions``.
            chunk: positions per yielded chunk.

        Yields:
            ``(row, start, logits)`` as :meth:`forward_chunks` does, for positions ``< L_row`` only; rows
            may come in any order, the chunks of one row in order. A sequence's logits depend on its own
            tokens alone, never on the other sequences of the call.
        """
        ...

    def generate(self, prompts: Sequence[torch.Tensor], settings: Any, seeds: Sequence[int],
                 stop_ids: Sequence[int]) -> list[Generation]:
        """One response per prompt (``int64[P_i]``), sampled as ``settings`` (a
        :class:`~logitcache.capture.config.GenerateConfig`) says with seed ``seeds[i]``, ending at a token of
        ``stop_ids``, a stop string or ``settings.max_new_tokens``. Optional: the capture of a corpus without
        ``generate`` settings never calls it."""
        ...

    def close(self) -> None:
        """Release the model and its device memory."""
        ...


def check_input_ids(input_ids: Any, chunk: int, *, name: str, max_positions: int, vocab_size: int) -> torch.Tensor:
    """Validate a batch for :meth:`Teacher.forward_chunks` before any compute; returns it unchanged."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        found = f"{type(input_ids).__name__}"
        if isinstance(input_ids, torch.Tensor):
            found = f"{input_ids.dtype} tensor of shape {tuple(input_ids.shape)}"
        raise TeacherError(f"input_ids must be an int64 tensor of shape [B, L]; found {found}")
    if not isinstance(chunk, int) or chunk < 1:
        raise TeacherError(f"chunk must be an integer >= 1; found {chunk!r}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise TeacherError(f"input_ids must be non-empty; found shape {tuple(input_ids.shape)}")
    if length > max_positions:
        raise TeacherError(
            f"windows of {length} tokens exceed teacher {name!r}'s {max_positions} positions; "
            f"use windows of at most {max_positions} tokens (seq_len <= {max_positions - 1})"
        )
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise TeacherError(f"token ids must lie in [0, {vocab_size}) for teacher {name!r}; found [{lo}, {hi}]")
    return input_ids


def check_sequences(sequences: Any, chunk: int, *, name: str, max_positions: int, vocab_size: int
                    ) -> list[torch.Tensor]:
    """Validate the sequences of :meth:`Teacher.forward_sequences` before any compute: each a 1-D int64
    tensor of 1 to ``max_positions`` ids in ``[0, vocab_size)``. Returns them as a list."""
    seqs = list(sequences) if isinstance(sequences, (list, tuple)) else None
    if not seqs:
        raise TeacherError(f"sequences must be a non-empty list of int64 tensors; found {type(sequences).__name__}"
                           + (" (empty)" if seqs == [] else ""))
    for i, seq in enumerate(seqs):
        if not isinstance(seq, torch.Tensor) or seq.dim() != 1 or seq.dtype != torch.long:
            found = (f"{seq.dtype} tensor of shape {tuple(seq.shape)}" if isinstance(seq, torch.Tensor)
                     else type(seq).__name__)
            raise TeacherError(f"sequence {i} must be a 1-D int64 tensor; found {found}")
        check_input_ids(seq[None], chunk, name=name, max_positions=max_positions, vocab_size=vocab_size)
    return seqs


def bucket_length(length: int, max_positions: int) -> int:
    """The padded length of a sequence of ``length`` tokens: the next multiple of :data:`BUCKET`, at most
    ``max_positions``. A function of the length alone, so a sequence is computed in the same shape
    whatever else is in its batch (which keeps stores byte-identical across batch compositions)."""
    return min(max_positions, -(-length // BUCKET) * BUCKET)


def bucket_groups(lengths: Sequence[int], max_positions: int) -> list[tuple[int, list[int]]]:
    """``(padded length, rows)`` groups of rows that share a :func:`bucket_length`, shortest first."""
    groups: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        groups.setdefault(bucket_length(length, max_positions), []).append(row)
    return sorted(groups.items())


def right_padded(seqs: Sequence[torch.Tensor], padded: int, device: torch.device) -> torch.Tensor:
    """``int64[n, padded]``: each sequence at the start of its row, padded on the right with id 0.

    Right padding needs no attention mask in a causal decoder: every real position attends only to
    positions before it, all real, and keeps its position ids; what the pads compute is never read.
    """
    batch = torch.zeros(len(seqs), padded, dtype=torch.long, device=device)
    for i, seq in enumerate(seqs):
        batch[i, : seq.numel()] = seq.to(device)
    return batch
