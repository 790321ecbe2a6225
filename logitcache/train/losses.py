"""Knowledge-distillation losses on sparse teacher targets: pure functions plus thin modules.

Notation: ``z`` student logits, ``p = softmax(z / τ)``, ``t̂`` the stored estimate of the teacher
distribution (``target_probs``, see :meth:`SparseTargets.estimate`), ``S`` the stored ids of one
position (``target_mask``), ``n`` the number of unmasked tokens. Every loss is a mean over unmasked
tokens; an all-masked batch gives 0 with zero gradient.

* :func:`sparse_kd_loss` — forward KL ``Σ_{i∈S} t̂_i (log t̂_i − log p_i)``. Its gradient with respect
  to ``z`` (τ = 1) is ``(p·Σt̂ − t̂) / n``: linear in ``t̂``, so unbiased whenever ``t̂`` is
  (RS-KD ``sample``, ``hybrid``). ``normalize=True`` divides ``t̂`` by ``Σ_S t̂`` first — vanilla
  top-k renormalised, biased by design. ``reverse=True`` is the reverse KL *on the stored support*
  (see :func:`sparse_kd_loss`).
* :func:`ghost_kd_loss` — top-k plus one "ghost" bucket holding the exact tail mass.
* :func:`full_kd_loss` — dense KD from full teacher logits (reference, online KD).
* :func:`kd_loss` — ``(1 − α)·CE(labels) + α·KD`` on a batch from :func:`logitcache.train.collate.collate`.

**Temperature.** Cached targets are the teacher at τ = 1 and cannot be re-tempered: top-k stores
the head's log-probabilities and the tail *mass*, but softening needs ``Σ_{j∉K} t_j^{1/τ}``, which
depends on how the tail is spread; RS-KD counts estimate ``t`` itself, and there is no unbiased
estimator of ``t^{1/τ} / Z(τ)`` from them. So ``temperature`` applies to the **student only**:
every sparse loss compares the stored teacher with ``softmax(z / τ)``. This is a well-defined
objective (the student's tempered distribution matches the τ = 1 teacher, so ``softmax(z)``
learns a sharpened/softened teacher) and stays unbiased for RS-KD; it is **not** Hinton's
two-sided softening. :func:`full_kd_loss`, which has the teacher logits, softens both sides. No
``τ²`` factor is applied anywhere; multiply yourself if you want it. The CE term always uses τ = 1.

**Memory.** Losses never build a dense ``[B, T, V]`` target. The student side goes through
:func:`gather_log_probs` (:mod:`logitcache.train.losses_student`), a custom autograd function that
computes ``log_softmax(z/τ)`` in row chunks and keeps only the gathered ``[..., U]`` values, so a bf16
``z`` is never copied whole to fp32. For logits that never exist whole, see
:func:`logitcache.train.losses_chunked.chunked_kd_loss`. ``impl="compiled"`` swaps this student
side for :mod:`logitcache.train.losses_fused` (``torch.compile``; one pass over ``V`` each way and no
fp32 ``[N, V]`` buffer at all), keeping every other line of the loss.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import LOSS_KINDS
from ..errors import ConfigError, TargetsError
from .losses_student import IMPLS, LogProbs, check_impl, gather_log_probs, log_probs_impl, plain_log_probs

__all__ = [
    "IMPLS",
    "KINDS",
    "KDLoss",
    "full_kd_loss",
    "gather_log_probs",
    "ghost_kd_loss",
    "kd_loss",
    "resolve_kind",
    "sparse_kd_loss",
]

KINDS = LOSS_KINDS
_AUTO = {"sample": "sparse", "hybrid": "sparse", "topk": "ghost", "full": "sparse"}
_FILL = -1e30  # finite stand-in for log 0 (keeps every gradient finite)


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(x, x)


def _forward_kl_tokens(logp: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Per-token ``Σ_u t (log t − log p)`` over masked entries; ``[N,U] -> [N]``."""
    t = torch.where(mask, probs.float(), 0.0)
    if normalize:
        total = t.sum(-1, keepdim=True)
        t = torch.where(total > 0, t / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return (_xlogx(t) - t * logp).sum(-1)


def _reverse_kl_tokens(logp: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(p̃ ‖ t̃)`` with both renormalised over the entries where ``t̂ > 0``."""
    valid = mask & (probs > 0)
    t = torch.where(valid, probs.float(), 0.0)
    log_t = torch.log(torch.where(valid, t, 1.0)) - torch.log(t.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
    logp = torch.where(valid, logp, _FILL)
    log_q = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    q = torch.where(valid, log_q.exp(), 0.0)
    return (q * torch.where(valid, log_q - log_t, 0.0)).sum(-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, stable on both branches; ``x`` clamped to ``≤ −eps``."""
    x = x.clamp(max=-torch.finfo(torch.float32).eps)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _ghost_tokens(logp: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Per-token ``Σ_K t (log t − log p) + m log(m / (1 − Σ_K p))``; ``[N,k], [N] -> [N]``."""
    head = _forward_kl_tokens(logp, probs, mask, normalize=False)
    log_head_p = torch.logsumexp(torch.where(mask, logp, _FILL), dim=-1)
    m = tail.float().clamp_min(0.0)
    return head + _xlogx(m) - m * _log1mexp(log_head_p)


def _masked_mean(per_token: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    if token_mask is None:
        return per_token.mean() if per_token.numel() else per_token.sum()
    token_mask = token_mask.reshape(per_token.shape)
    total = torch.where(token_mask, per_token, 0.0).sum()
    return total / token_mask.sum().clamp_min(1)


def sparse_kd_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    normalize: bool = False,
    reverse: bool = False,
) -> torch.Tensor:
    """KL between stored sparse targets and the student, mean over unmasked tokens.

    Args:
        logits: ``[B,T,V]`` student logits (any float dtype; computed in fp32).
        target_ids, target_probs, target_mask: ``int64/float32/bool[B,T,U]`` (from ``collate``).
        token_mask: ``bool[B,T]``, tokens that count; default all.
        temperature: student-only temperature τ, ``p = softmax(z/τ)`` (see module docstring).
        normalize: renormalise ``t̂`` over the stored entries (vanilla top-k; biased).
        reverse: reverse KL restricted to the stored support ``S = {i : mask_i, t̂_i > 0}``:
            ``KL(p̃ ‖ t̃) = Σ_{i∈S} p̃_i log(p̃_i / t̃_i)`` with ``p̃ = p / Σ_S p`` and
            ``t̃ = t̂ / Σ_S t̂``. It matches the *shape* of the student on ``S`` to the teacher's
            and is blind to the student mass outside ``S`` (``1 − Σ_S p`` is free): this is NOT
            the full reverse KL ``KL(p ‖ t)``, which needs the teacher everywhere. The gradient
            equals that of ``KL(p̃ ‖ t̂)`` (they differ by the constant ``log Σ_S t̂``). With RS-KD
            targets it is biased (``log t̃`` of an estimate). ``normalize`` is ignored.

    Forward KL (default) is ``Σ_{i∈S} t̂_i (log t̂_i − log p_i)``; entries with ``t̂ = 0``
    contribute 0. Gradient wrt logits (τ = 1): ``(p·Σt̂ − t̂) / n_tokens``.
    """
    logp = gather_log_probs(logits, target_ids, temperature=temperature)
    if reverse:
        per_token = _reverse_kl_tokens(logp, target_probs, target_mask)
    else:
        per_token = _forward_kl_tokens(logp, target_probs, target_mask, normalize)
    return _masked_mean(per_token, token_mask)


def ghost_kd_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    target_mask: torch.Tensor,
    tail_mass: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Top-k with a ghost token: ``Σ_{i∈K} t_i log(t_i/p_i) + m log(m / (1 − Σ_K p))``.

    ``target_*`` are ``[B,T,k]`` head entries (exact teacher probabilities), ``tail_mass``
    ``float32[B,T]`` the exact teacher mass ``m`` outside the head. ``log(1 − Σ_K p)`` is computed
    as ``log1mexp(logsumexp_K log p)``, with ``Σ_K p`` clamped to ``≤ 1 − 1.2e-7`` (fp32 eps) so a
    student that puts all its mass on the head gets a finite loss and gradient.
    """
    logp = gather_log_probs(logits, target_ids, temperature=temperature)
    return _masked_mean(_ghost_tokens(logp, target_probs, target_mask, tail_mass), token_mask)


def full_kd_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Dense ``KL(softmax(teacher/τ) ‖ softmax(z/τ))``, mean over unmasked tokens (no ``τ²``).

    Both sides are softened (the teacher logits are known). Builds several ``[B,T,V]`` fp32
    tensors: a reference and an online-KD loss, not meant for long contexts.
    """
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (log_t.exp() * (log_t - logp)).sum(-1)
    return _masked_mean(per_token, token_mask)


def resolve_kind(kind: str, method: str) -> str:
    """The loss ``kind`` that ``auto`` means for a target ``method``; validates the pair."""
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}; found {kind!r}")
    if kind == "auto":
        if method not in _AUTO:
            raise TargetsError(f"unknown target method {method!r}; expected one of {', '.join(_AUTO)} (a batch "
                               "from logitcache.collate carries its store's method)")
        return _AUTO[method]
    if kind == "ghost" and method == "sample":
        raise ConfigError("kind 'ghost' needs a top-k head and its tail mass; method 'sample' has neither. "
                          "Use kind 'sparse' (unbiased RS-KD) instead.")
    return kind


class _Targets(NamedTuple):
    """Batch targets flattened to rows ``N = B·T`` (sliceable for chunked losses)."""

    labels: torch.Tensor  # int64[N]
    ids: torch.Tensor  # int64[N,U]
    probs: torch.Tensor  # float32[N,U]
    mask: torch.Tensor  # bool[N,U]
    tail: torch.Tensor  # float32[N]

    def rows(self, start: int, stop: int) -> _Targets:
        return _Targets(*(x[start:stop] for x in self))


def flatten_batch(batch: dict[str, Any], device: torch.device) -> _Targets:
    """``_Targets`` from a collated batch, on ``device``."""
    u = batch["target_ids"].shape[-1]
    return _Targets(
        batch["labels"].reshape(-1).to(device),
        batch["target_ids"].reshape(-1, u).to(device),
        batch["target_probs"].reshape(-1, u).to(device),
        batch["target_mask"].reshape(-1, u).to(device),
        batch["target_tail_mass"].reshape(-1).to(device),
    )


def token_losses(
    logits: torch.Tensor, tg: _Targets, *, kind: str, head_size: int, temperature: float, ignore_index: int,
    need_ce: bool = True, need_kd: bool = True, log_probs: LogProbs = plain_log_probs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(ce float32[N], kd float32[N])`` for rows ``logits[N,V]``; ``kind`` resolved.

    A term not needed is returned as zeros (and costs nothing). Shared by :func:`kd_loss` and the
    chunked loss so both compute exactly the same function; ``log_probs`` is the student side.
    """
    zeros = logits.new_zeros(logits.shape[0], dtype=torch.float32)
    label_ids = torch.where(tg.labels == ignore_index, 0, tg.labels)[:, None]
    ids = tg.ids[:, :head_size] if kind == "ghost" else tg.ids
    logp, logp_label = log_probs(logits, ids, label_ids, temperature, need_ce, need_kd)
    ce = -logp_label if need_ce else zeros
    if not need_kd:
        return ce, zeros
    if kind == "ghost":
        k = slice(0, head_size)
        kd = _ghost_tokens(logp, tg.probs[:, k], tg.mask[:, k], tg.tail)
    elif kind == "reverse":
        kd = _reverse_kl_tokens(logp, tg.probs, tg.mask)
    else:
        kd = _forward_kl_tokens(logp, tg.probs, tg.mask, normalize=kind == "topk_renorm")
    return ce, kd


def check_loss_args(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1]; found {alpha!r}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0; found {temperature!r}")


def kd_loss(
    logits: torch.Tensor,
    batch: dict[str, Any],
    *,
    alpha: float = 0.5,
    kind: str = "auto",
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "plain",
) -> torch.Tensor:
    """``(1 − α)·CE(labels) + α·KD`` on a collated batch, mean over tokens with a label.

    ``kind``: ``auto`` (sample, hybrid, full → ``sparse``; topk → ``ghost``), ``sparse`` (forward
    KL, unbiased for RS-KD), ``topk_renorm`` (targets renormalised over the stored ids),
    ``ghost`` (head + tail-mass bucket; uses only the first ``target_head_size`` entries) or
    ``reverse`` (reverse KL on the stored support, see :func:`sparse_kd_loss`). ``temperature``
    applies to the student in the KD term only; CE uses τ = 1. Tokens are those with
    ``labels != ignore_index``. ``impl="compiled"`` computes the same function through
    ``torch.compile`` (:mod:`logitcache.train.losses_fused`; the plain path where compiling fails).
    """
    check_loss_args(alpha, temperature)
    kind = resolve_kind(kind, batch["target_method"])
    log_probs = log_probs_impl(impl, logits.device)
    tg = flatten_batch(batch, logits.device)
    token_mask = tg.labels != ignore_index
    ce, kd = token_losses(
        logits.reshape(-1, logits.shape[-1]), tg, kind=kind, head_size=int(batch["target_head_size"]),
        temperature=temperature, ignore_index=ignore_index, need_ce=alpha < 1.0, need_kd=alpha > 0.0,
        log_probs=log_probs,
    )
    return _masked_mean((1.0 - alpha) * ce + alpha * kd, token_mask)


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`: ``KDLoss(alpha=0.5)(logits, batch) -> scalar``."""

    def __init__(self, *, alpha: float = 0.5, kind: str = "auto", temperature: float = 1.0, ignore_index: int = -100,
                 impl: str = "plain"):
        super().__init__()
        check_loss_args(alpha, temperature)
        resolve_kind(kind, "hybrid")
        check_impl(impl)
        self.alpha, self.kind, self.temperature, self.ignore_index = alpha, kind, temperature, ignore_index
        self.impl = impl

    def forward(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return kd_loss(logits, batch, alpha=self.alpha, kind=self.kind, temperature=self.temperature,
                       ignore_index=self.ignore_index, impl=self.impl)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, kind={self.kind!r}, temperature={self.temperature}, impl={self.impl!r}"
