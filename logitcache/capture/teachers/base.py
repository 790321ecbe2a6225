"""The teacher protocol: what stage 2 ("teach") promises to the sparsifier.

A teacher turns a batch of token windows into next-token logits *on its own device*, one
chunk of one sequence at a time, so full-vocabulary logits for a whole batch never exist at
once and never leave the device. Results never depend on how windows were batched: the
output head is applied per sequence per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from ...errors import TeacherError

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
