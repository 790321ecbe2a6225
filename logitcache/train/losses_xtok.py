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
one fp32 ``[n, V]`` softmax for the ``n`` KD positions; the hidden-state (chunked) form is not there yet.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..errors import ConfigError
from .losses import check_loss_args, gather_log_probs, sparse_kd_loss

__all__ = ["XTokTerms", "cross_tokenizer_kd_loss", "cross_tokenizer_terms"]


class XTokTerms(NamedTuple):
    """The three terms of the cross-tokenizer loss, each a scalar mean (0 where no position counts)."""

    ce: torch.Tensor
    exact: torch.Tensor
    uld: torch.Tensor


def _mean(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, per_row, 0.0).sum() / mask.sum().clamp_min(1)


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


def cross_tokenizer_terms(logits: torch.Tensor, batch: dict[str, Any], *, temperature: float = 1.0,
                          ignore_index: int = -100) -> XTokTerms:
    """:class:`XTokTerms` of student ``logits [B, T, V]`` on a cross-tokenizer batch (module docstring)."""
    v, device = logits.shape[-1], logits.device
    z = logits.reshape(-1, v)
    labels = batch["labels"].reshape(-1).to(device)
    labelled = labels != ignore_index
    ce = -gather_log_probs(z, torch.where(labelled, labels, 0)[:, None])[:, 0]
    kd_mask = batch["kd_mask"].reshape(-1).to(device)
    rows_of = {key: batch[key].flatten(0, 1).to(device) for key in ("target_ids", "target_probs", "target_mask",
                                                                      "uld_probs", "uld_mask")}
    exact = sparse_kd_loss(z, rows_of["target_ids"], rows_of["target_probs"], rows_of["target_mask"],
                           token_mask=kd_mask, temperature=temperature)
    matched = batch["student_matched"].to(device)
    if matched.numel() > v:
        raise ConfigError(f"the student's logits have {v} entries; its tokenizer has {matched.numel()} ids. Use "
                          "the student tokenizer the model was built for")
    matched = torch.nn.functional.pad(matched, (0, v - matched.numel()))
    rows = kd_mask.nonzero()[:, 0]
    uld = _uld(z[rows], rows_of["uld_probs"][rows], rows_of["uld_mask"][rows], matched, temperature)
    return XTokTerms(_mean(ce, labelled), exact, uld.sum() / max(int(rows.numel()), 1))


def cross_tokenizer_kd_loss(logits: torch.Tensor, batch: dict[str, Any], *, alpha: float = 0.5,
                            matched_weight: float = 1.0, unmatched_weight: float = 1.0, temperature: float = 1.0,
                            ignore_index: int = -100) -> torch.Tensor:
    """``(1 − α)·CE + α·(matched_weight·KL_exact + unmatched_weight·ULD)`` (module docstring)."""
    check_loss_args(alpha, temperature)
    if matched_weight < 0 or unmatched_weight < 0:
        raise ConfigError(f"matched_weight and unmatched_weight must be >= 0; found {matched_weight!r}, "
                          f"{unmatched_weight!r}")
    terms = cross_tokenizer_terms(logits, batch, temperature=temperature, ignore_index=ignore_index)
    return (1.0 - alpha) * terms.ce + alpha * (matched_weight * terms.exact + unmatched_weight * terms.uld)
