"""The cross-tokenizer KD loss on a batch from :class:`logitcache.train.cross_tokenizer.CrossTokenizerTransform`.

``loss = (1 − α)·CE + α·(w_m·KL_exact + w_u·ULD)`` where

* ``CE`` is the student's cross-entropy on its own next tokens (``labels``), mean over labelled positions;
* ``KL_exact`` is the forward KL ``Σ_u q_u (log q_u − log p_u)`` on the exact part ``q`` (stored teacher
  entries moved to the student ids with the same bytes; ``target_*``), mean over ``kd_mask`` positions: the
  same function as :func:`logitcache.train.losses.sparse_kd_loss`, so its gradient is linear in ``q`` and
  unbiased wherever ``q`` is (RS-KD, hybrid);
* ``ULD`` is the L1 distance between the teacher entries that have no student id, sorted by probability
  (``uld_probs``), and the student's largest probabilities among the ids no teacher id maps to (``p``
  sorted, the first ``n`` ranks, ``n`` the teacher's count there), mean over ``kd_mask`` positions.

``temperature`` applies to the student in both KD terms (as everywhere in logitcache). The ULD term builds
one fp32 ``[n, V]`` softmax for the ``n`` KD positions; the hidden-state form
(:func:`logitcache.train.losses_xtok_chunked.chunked_cross_tokenizer_kd_loss`) builds one chunk's at a time.
Both compute the same per-position function, :func:`xtok_row_terms`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..errors import ConfigError
from .losses import _Targets, check_loss_args, token_losses

__all__ = ["XTokRows", "XTokTerms", "cross_tokenizer_kd_loss", "cross_tokenizer_terms", "flatten_xtok_batch",
           "xtok_row_terms"]


class XTokTerms(NamedTuple):
    """The three terms of the cross-tokenizer loss, each a scalar mean (0 where no position counts)."""

    ce: torch.Tensor
    exact: torch.Tensor
    uld: torch.Tensor


class XTokRows(NamedTuple):
    """A cross-tokenizer batch flattened to rows ``N = B·T`` (sliceable for the chunked loss)."""

    labels: torch.Tensor  # int64[N]
    kd_mask: torch.Tensor  # bool[N]
    ids: torch.Tensor  # int64[N, U]
    probs: torch.Tensor  # float32[N, U]
    mask: torch.Tensor  # bool[N, U]
    uld: torch.Tensor  # float32[N, W]
    uld_mask: torch.Tensor  # bool[N, W]

    def rows(self, start: int, stop: int) -> XTokRows:
        return XTokRows(*(x[start:stop] for x in self))


def flatten_xtok_batch(batch: dict[str, Any], vocab: int, device: torch.device) -> tuple[XTokRows, torch.Tensor]:
    """``(rows, matched bool[vocab])`` of a batch from ``CrossTokenizerTransform.collate`` for a student whose
    logits have ``vocab`` entries (its tokenizer's ids, padded: ids beyond them are never matched)."""
    matched = batch["student_matched"].to(device)
    if matched.numel() > vocab:
        raise ConfigError(f"the student's logits have {vocab} entries; its tokenizer has {matched.numel()} ids. Use "
                          "the student tokenizer the model was built for")
    rows = XTokRows(batch["labels"].reshape(-1), batch["kd_mask"].reshape(-1),
                    *(batch[key].flatten(0, 1) for key in ("target_ids", "target_probs", "target_mask", "uld_probs",
                                                             "uld_mask")))
    return XTokRows(*(x.to(device) for x in rows)), torch.nn.functional.pad(matched, (0, vocab - matched.numel()))


def _uld(z: torch.Tensor, teacher: torch.Tensor, present: torch.Tensor, matched: torch.Tensor,
         temperature: float) -> torch.Tensor:
    """Per-row ``Σ_r |t_(r) − p_(r)|`` over the ranks ``r`` the teacher has (``present``); ``[n, V] -> [n]``."""
    width = teacher.shape[-1]
    if width == 0 or z.shape[0] == 0:
        return z.new_zeros(z.shape[0], dtype=torch.float32)
    p = torch.softmax(z.float() / temperature, dim=-1).masked_fill(matched[None, :], 0.0)
    top = p.topk(min(width, p.shape[-1]), dim=-1).values
    if top.shape[-1] < width:
        top = torch.nn.functional.pad(top, (0, width - top.shape[-1]))
    return torch.where(present, (top - teacher.float()).abs(), 0.0).sum(-1)


def xtok_row_terms(z: torch.Tensor, rows: XTokRows, matched: torch.Tensor, *, temperature: float,
                   ignore_index: int, need_ce: bool = True, need_kd: bool = True) -> XTokTerms:
    """Per-row ``(ce, exact, uld)``, each ``float32[N]`` and 0 where its mask is off (``labels`` for CE,
    ``kd_mask`` for the KD terms), of student logits ``z [N, V]``. The CE and the exact-match KL are
    :func:`~logitcache.train.losses.token_losses` (``kind="sparse"``), the ordinary path's own function."""
    labelled = rows.labels != ignore_index
    targets = _Targets(rows.labels, rows.ids, rows.probs, rows.mask, rows.probs.new_zeros(rows.labels.shape))
    ce, exact = token_losses(z, targets, kind="sparse", head_size=0, temperature=temperature,
                             ignore_index=ignore_index, need_ce=need_ce, need_kd=need_kd)
    uld = torch.zeros_like(exact)
    if need_kd:
        at = rows.kd_mask.nonzero()[:, 0]
        uld = uld.index_put((at,), _uld(z[at], rows.uld[at], rows.uld_mask[at], matched, temperature))
    return XTokTerms(torch.where(labelled, ce, 0.0), torch.where(rows.kd_mask, exact, 0.0), uld)


def cross_tokenizer_terms(logits: torch.Tensor, batch: dict[str, Any], *, temperature: float = 1.0,
                          ignore_index: int = -100) -> XTokTerms:
    """:class:`XTokTerms` of student ``logits [B, T, V]`` on a cross-tokenizer batch (module docstring)."""
    v = logits.shape[-1]
    rows, matched = flatten_xtok_batch(batch, v, logits.device)
    per_row = xtok_row_terms(logits.reshape(-1, v), rows, matched, temperature=temperature, ignore_index=ignore_index)
    n_ce, n_kd = term_counts(rows, ignore_index)
    return XTokTerms(per_row.ce.sum() / n_ce, per_row.exact.sum() / n_kd, per_row.uld.sum() / n_kd)


def term_counts(rows: XTokRows, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labelled rows, KD rows)``, each at least 1: the denominators of the means."""
    return ((rows.labels != ignore_index).sum().clamp_min(1).float(), rows.kd_mask.sum().clamp_min(1).float())


def check_xtok_args(alpha: float, temperature: float, matched_weight: float, unmatched_weight: float) -> None:
    check_loss_args(alpha, temperature)
    if matched_weight < 0 or unmatched_weight < 0:
        raise ConfigError(f"matched_weight and unmatched_weight must be >= 0; found {matched_weight!r}, "
                          f"{unmatched_weight!r}")


def cross_tokenizer_kd_loss(logits: torch.Tensor, batch: dict[str, Any], *, alpha: float = 0.5,
                            matched_weight: float = 1.0, unmatched_weight: float = 1.0, temperature: float = 1.0,
                            ignore_index: int = -100) -> torch.Tensor:
    """``(1 − α)·CE + α·(matched_weight·KL_exact + unmatched_weight·ULD)`` (module docstring)."""
    check_xtok_args(alpha, temperature, matched_weight, unmatched_weight)
    terms = cross_tokenizer_terms(logits, batch, temperature=temperature, ignore_index=ignore_index)
    return (1.0 - alpha) * terms.ce + alpha * (matched_weight * terms.exact + unmatched_weight * terms.uld)
