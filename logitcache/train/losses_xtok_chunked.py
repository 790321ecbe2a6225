"""The cross-tokenizer KD loss from hidden states and the LM head, never materialising the ``[B·T, V]`` logits.

:func:`chunked_cross_tokenizer_kd_loss` is :func:`logitcache.train.losses_xtok.cross_tokenizer_kd_loss` on
``hidden @ head_weightᵀ``: the same per-position function (:func:`~logitcache.train.losses_xtok.xtok_row_terms`)
on ``chunk_size`` positions at a time, through the chunked machinery of the ordinary loss
(:func:`logitcache.train.losses_chunked.chunked_linear_loss`: gradients taken during the forward pass, each
chunk's logits dropped after it). Every term is a mean over the whole batch (its denominator is counted
before the first chunk), so the chunked sum is the plain loss, up to summation order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .losses_chunked import chunked_linear_loss
from .losses_xtok import check_xtok_args, flatten_xtok_batch, term_counts, xtok_row_terms

__all__ = ["ChunkedCrossTokenizerKDLoss", "chunked_cross_tokenizer_kd_loss"]


def chunked_cross_tokenizer_kd_loss(
    hidden: torch.Tensor, head_weight: torch.Tensor, batch: dict[str, Any], *, alpha: float = 0.5,
    matched_weight: float = 1.0, unmatched_weight: float = 1.0, chunk_size: int = 1024, temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``cross_tokenizer_kd_loss(hidden[B,T,d] @ head_weight[V,d]ᵀ, batch, ...)``, chunk by chunk (module docstring).

    As :func:`~logitcache.train.losses_chunked.chunked_kd_loss`: the gradients with respect to ``hidden`` and
    ``head_weight`` are computed in the forward pass, the head has no bias, ``chunk_size`` is positions per chunk.
    """
    check_xtok_args(alpha, temperature, matched_weight, unmatched_weight)
    vocab, d = head_weight.shape[0], hidden.shape[-1]
    rows, matched = flatten_xtok_batch(batch, vocab, hidden.device)
    n_ce, n_kd = term_counts(rows, ignore_index)
    w_ce, w_exact, w_uld = (1.0 - alpha) / n_ce, alpha * matched_weight / n_kd, alpha * unmatched_weight / n_kd

    def chunk_loss(logits: torch.Tensor, s: int, e: int) -> torch.Tensor:
        terms = xtok_row_terms(logits, rows.rows(s, e), matched, temperature=float(temperature),
                               ignore_index=ignore_index, need_ce=alpha < 1.0, need_kd=alpha > 0.0)
        return (w_ce * terms.ce + w_exact * terms.exact + w_uld * terms.uld).sum()

    return chunked_linear_loss(hidden.reshape(-1, d), head_weight, chunk_loss, chunk_size)


class ChunkedCrossTokenizerKDLoss(nn.Module):
    """Module form: ``ChunkedCrossTokenizerKDLoss(alpha=0.5)(hidden, head_weight, batch)``."""

    def __init__(self, *, alpha: float = 0.5, matched_weight: float = 1.0, unmatched_weight: float = 1.0,
                 chunk_size: int = 1024, temperature: float = 1.0, ignore_index: int = -100) -> None:
        super().__init__()
        check_xtok_args(alpha, temperature, matched_weight, unmatched_weight)
        self.options = {"alpha": alpha, "matched_weight": matched_weight, "unmatched_weight": unmatched_weight,
                        "chunk_size": chunk_size, "temperature": temperature, "ignore_index": ignore_index}

    def forward(self, hidden: torch.Tensor, head_weight: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return chunked_cross_tokenizer_kd_loss(hidden, head_weight, batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
