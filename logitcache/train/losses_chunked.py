"""KD loss from hidden states and the LM head, never materialising the full ``[B·T, V]`` logits.

Like Liger-Kernel's fused linear cross-entropy: the forward pass walks ``chunk_size`` positions at a
time, computes that chunk's logits ``h @ Wᵀ``, its share of the loss and, right away, the gradients
with respect to ``h`` and ``W``; the chunk's logits are then dropped. Backward only scales the
stored gradients by the incoming scalar. Peak extra memory is ``O(chunk_size · V)`` plus one
``[V, d]`` fp32 gradient accumulator, instead of ``[B·T, V]`` logits and their gradient.

The loss is exactly :func:`logitcache.train.losses.kd_loss` on ``hidden @ head_weight.T`` (the same
per-token function, :func:`logitcache.train.losses.token_losses`, on each chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .losses import check_loss_args, flatten_batch, resolve_kind, token_losses
from .losses_student import check_impl, log_probs_impl

__all__ = ["ChunkLoss", "ChunkedKDLoss", "chunked_kd_loss", "chunked_linear_loss"]


ChunkLoss = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``chunk_loss(logits[c, V], start, stop)``: the scalar share of the loss of rows ``start:stop``."""


class _ChunkedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, chunk_loss: ChunkLoss, chunk_size: int
                ) -> torch.Tensor:
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            e = s + chunk_size
            h = hidden[s:e]
            logits = (h @ weight.T).requires_grad_(True)
            with torch.enable_grad():
                part = chunk_loss(logits, s, e)
            (g,) = torch.autograd.grad(part, logits)
            total += part.detach()
            grad_h[s:e] = g @ weight
            grad_w += (g.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        grad_h, grad_w = ctx.saved_tensors
        if not torch.equal(grad_out, torch.ones_like(grad_out)):
            grad_h, grad_w = grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None


def chunked_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, chunk_loss: ChunkLoss, chunk_size: int
                        ) -> torch.Tensor:
    """``Σ_chunks chunk_loss(hidden[s:e] @ weightᵀ, s, e)`` for ``hidden [N, d]``, ``weight [V, d]``: the logits of
    one chunk at a time, with the gradients with respect to ``hidden`` and ``weight`` taken during the forward
    pass (module docstring). Any loss that is a sum of per-chunk terms can use it."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1; found {chunk_size!r}")
    return _ChunkedLinear.apply(hidden, weight, chunk_loss, int(chunk_size))


def chunked_kd_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    batch: dict[str, Any],
    *,
    alpha: float = 0.5,
    kind: str = "auto",
    chunk_size: int = 1024,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "plain",
) -> torch.Tensor:
    """:func:`~logitcache.train.losses.kd_loss` of ``hidden[B,T,d] @ head_weight[V,d]ᵀ``, chunk by chunk.

    Gradients with respect to ``hidden`` and ``head_weight`` are computed during the forward pass
    (so it costs the backward's work even under ``no_grad``) and equal those of the plain version
    up to summation order. The head has no bias. ``chunk_size`` is positions per chunk. ``impl="compiled"``:
    each chunk's loss through ``torch.compile`` (:mod:`logitcache.train.losses_fused`).
    """
    check_loss_args(alpha, temperature)
    kind = resolve_kind(kind, batch["target_method"])
    log_probs = log_probs_impl(impl, hidden.device)
    head_size, d = int(batch["target_head_size"]), hidden.shape[-1]
    tg = flatten_batch(batch, hidden.device)
    token_mask = tg.labels != ignore_index
    denom = token_mask.sum().clamp_min(1).to(torch.float32)

    def chunk_loss(logits: torch.Tensor, s: int, e: int) -> torch.Tensor:
        ce, kd = token_losses(logits, tg.rows(s, e), kind=kind, head_size=head_size, temperature=float(temperature),
                              ignore_index=ignore_index, need_ce=alpha < 1.0, need_kd=alpha > 0.0,
                              log_probs=log_probs)
        return torch.where(token_mask[s:e], (1.0 - alpha) * ce + alpha * kd, 0.0).sum() / denom

    return chunked_linear_loss(hidden.reshape(-1, d), head_weight, chunk_loss, chunk_size)


class ChunkedKDLoss(nn.Module):
    """Module form of :func:`chunked_kd_loss`: ``ChunkedKDLoss(impl="compiled")(hidden, head_weight, batch)``."""

    def __init__(
        self, *, alpha: float = 0.5, kind: str = "auto", chunk_size: int = 1024, temperature: float = 1.0,
        ignore_index: int = -100, impl: str = "plain",
    ):
        super().__init__()
        check_loss_args(alpha, temperature)
        resolve_kind(kind, "hybrid")
        check_impl(impl)
        self.alpha, self.kind, self.chunk_size = alpha, kind, chunk_size
        self.temperature, self.ignore_index, self.impl = temperature, ignore_index, impl

    def forward(self, hidden: torch.Tensor, head_weight: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return chunked_kd_loss(
            hidden, head_weight, batch, alpha=self.alpha, kind=self.kind, chunk_size=self.chunk_size,
            temperature=self.temperature, ignore_index=self.ignore_index, impl=self.impl,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, kind={self.kind!r}, chunk_size={self.chunk_size}, impl={self.impl!r}"
