"""Evaluation metrics for distilled students and for sparse-target estimators (pure torch).

* :func:`calibration_bins` / :func:`expected_calibration_error` — reliability of top-1
  confidence: ``B`` equal-width bins on ``[0, 1]`` (bin ``b`` holds confidences in
  ``[b/B, (b+1)/B)``, the last bin also holds 1.0); ``ECE = Σ_b (n_b / n) |acc_b − conf_b|``.
* :func:`gradient_angle` / :func:`norm_ratio` — compare a gradient with a reference gradient
  (the RS-KD paper's "angle and norm ratio to the full-KD gradient").
* :func:`dense_estimate` — the stored estimate ``t̂`` of :class:`SparseTargets` as a dense
  ``[T, V]`` tensor (for estimator bias and variance on small reference sets).
* :func:`ghost_effective_target` — the target ``y`` whose gradient ``p − y`` equals that of the
  ghost-token loss for a given student ``p``: the head exactly, the tail mass spread over the
  tail *in the student's proportions*.
* :func:`kl_per_position` — dense ``KL(softmax(t) ‖ softmax(z))`` per position.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, TargetsError
from ..targets import SparseTargets

__all__ = [
    "calibration_bins",
    "dense_estimate",
    "expected_calibration_error",
    "ghost_effective_target",
    "gradient_angle",
    "kl_per_position",
    "norm_ratio",
]


def _check_pair(confidence: torch.Tensor, correct: torch.Tensor, bins: int) -> None:
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise TargetsError(f"confidence and correct must be 1-D of equal length; found shapes "
                           f"{list(confidence.shape)} and {list(correct.shape)}")
    if not isinstance(bins, int) or bins < 1:
        raise ConfigError(f"bins must be an integer >= 1; found {bins!r}")
    if confidence.numel() and not bool(((confidence >= 0) & (confidence <= 1)).all()):
        raise TargetsError("confidence must lie in [0, 1]; found values outside (or NaN). Pass probabilities, "
                           "not logits.")


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> dict[str, torch.Tensor]:
    """Per bin ``count int64[B]``, ``confidence float64[B]`` (mean) and ``accuracy float64[B]``.

    Empty bins have count 0 and NaN means. ``confidence`` float[n] in ``[0, 1]``, ``correct`` bool[n].
    """
    _check_pair(confidence, correct, bins)
    conf = confidence.double()
    index = (conf * bins).floor().long().clamp_(0, bins - 1)
    count = torch.bincount(index, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct.double())
    denom = count.double()
    nan = torch.full_like(denom, math.nan)
    return {"count": count, "confidence": torch.where(count > 0, conf_sum / denom.clamp_min(1), nan),
            "accuracy": torch.where(count > 0, acc_sum / denom.clamp_min(1), nan)}


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """``Σ_b (n_b / n) |accuracy_b − confidence_b|`` over non-empty equal-width bins (0 for n = 0)."""
    table = calibration_bins(confidence, correct, bins)
    n = int(table["count"].sum())
    if n == 0:
        return 0.0
    used = table["count"] > 0
    gap = (table["accuracy"][used] - table["confidence"][used]).abs()
    return float((table["count"][used].double() * gap).sum() / n)


def _flat(x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).double()
    return torch.cat([t.reshape(-1).double() for t in x])


def gradient_angle(grad: torch.Tensor | list[torch.Tensor], reference: torch.Tensor | list[torch.Tensor]) -> float:
    """Angle in degrees between two gradients (tensors or lists of per-parameter tensors)."""
    a, b = _flat(grad), _flat(reference)
    if a.shape != b.shape:
        raise TargetsError(f"gradients differ in size: {a.numel()} vs {b.numel()} elements; expected gradients "
                           "of the same parameters in the same order")
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        raise TargetsError("the angle of a zero gradient is undefined; found a zero vector")
    cos = float((a @ b) / (na * nb))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def norm_ratio(grad: torch.Tensor | list[torch.Tensor], reference: torch.Tensor | list[torch.Tensor]) -> float:
    """``‖grad‖ / ‖reference‖``."""
    a, b = _flat(grad), _flat(reference)
    nb = float(b.norm())
    if nb == 0:
        raise TargetsError("the reference gradient is zero; a norm ratio is undefined")
    return float(a.norm()) / nb


def dense_estimate(targets: SparseTargets, vocab_size: int) -> torch.Tensor:
    """``float64[T, V]`` with ``t̂`` (see :meth:`SparseTargets.estimate`) at the stored ids, 0 elsewhere."""
    offsets, ids, probs = targets.estimate()
    t = targets.num_positions
    rows = torch.repeat_interleave(torch.arange(t), offsets[1:] - offsets[:-1])
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise TargetsError(f"targets hold id {int(ids.max())}; expected ids < vocab_size={vocab_size} "
                           "(pass the teacher's vocabulary size)")
    out = torch.zeros(t, vocab_size, dtype=torch.float64)
    out.index_put_((rows, ids), probs.double(), accumulate=True)
    return out


def ghost_effective_target(targets: SparseTargets, student_probs: torch.Tensor) -> torch.Tensor:
    """``float64[T, V]`` target ``y`` with ``∂ ghost_loss / ∂z = p − y`` (per position, τ = 1).

    ``y_i = t_i`` on the head ``K``; off the head ``y_j = m · p_j / (1 − Σ_K p)``, with ``m`` the
    stored tail mass and ``p = student_probs`` (float[T, V], rows summing to 1).
    """
    if not targets.has_head or targets.tail_mass is None:
        raise TargetsError(f"the ghost target needs a top-k head and tail mass; method {targets.method!r} has none. "
                           "Use targets of method 'topk' or 'hybrid'.")
    p = student_probs.double()
    if p.shape[0] != targets.num_positions:
        raise TargetsError(f"student_probs has {p.shape[0]} rows; the targets cover {targets.num_positions} "
                           "positions. Expected one row per position.")
    ids = targets.head_ids.long()
    head_p = p.gather(1, ids).sum(1, keepdim=True)
    y = p * (targets.tail_mass.double()[:, None] / (1.0 - head_p).clamp_min(1e-30))
    y.scatter_(1, ids, targets.head_logprobs.double().exp())
    return y


def kl_per_position(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``float32[N]`` dense ``KL(softmax(teacher) ‖ softmax(student))`` over the last dimension."""
    if teacher_logits.shape != student_logits.shape:
        raise TargetsError(f"logits differ in shape: teacher {list(teacher_logits.shape)}, "
                           f"student {list(student_logits.shape)}; expected equal shapes")
    v = teacher_logits.shape[-1]
    log_t = torch.log_softmax(teacher_logits.reshape(-1, v).float(), -1)
    log_p = torch.log_softmax(student_logits.reshape(-1, v).float(), -1)
    return (log_t.exp() * (log_t - log_p)).sum(-1)
