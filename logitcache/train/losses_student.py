"""The student side of the sparse KD losses: the student's ``log softmax(z/τ)`` at the stored ids.

:func:`gather_log_probs` computes ``log_softmax(z/τ)`` in row chunks (each upcast to fp32) and keeps only
the gathered ``[..., U]`` values: forward retains ``z`` (alive anyway) and ``O(B·T·U)`` results;
backward recomputes the softmax per chunk and writes the ``[B, T, V]`` gradient in ``z``'s dtype, so a
bf16 ``z`` is never copied whole to fp32. :data:`LogProbs` is what a student side gives the losses
(:func:`logitcache.train.losses.token_losses`): :func:`plain_log_probs` through :func:`gather_log_probs`,
or :func:`logitcache.train.losses_fused.compiled_log_probs` (``torch.compile``); :func:`log_probs_impl`
picks one for ``impl``. Every name here is importable from :mod:`logitcache.train.losses` too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..choices import LOSS_IMPLS
from ..errors import ConfigError

__all__ = ["IMPLS", "LogProbs", "check_impl", "gather_log_probs", "log_probs_impl", "plain_log_probs"]

IMPLS = LOSS_IMPLS  # the student side: chunked eager torch, or torch.compile (losses_fused)

# fp32 elements per row chunk: on the CPU 8 MiB (below glibc's mmap threshold cap); on a GPU 256 MiB,
# since there each chunk costs a few kernel launches and small chunks made the loss launch-bound
# (13 rows per chunk at V = 152064 ran 4.8x slower than cross-entropy on an H100; docs/benchmarks.md)
_CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}


def _chunk_rows(z: torch.Tensor) -> int:
    """Rows of ``z[N, V]`` per chunk on ``z``'s device."""
    return max(1, _CHUNK_ELEMENTS.get(z.device.type, _CHUNK_ELEMENTS["cpu"]) // max(z.shape[1], 1))


class _GatherLogSoftmax(torch.autograd.Function):
    """``float32[N,U]`` of ``log_softmax(z/τ)[ids]`` from ``z[N,V]``, computed in row chunks.

    Forward keeps only ``z`` (alive anyway) and ``ids``; backward recomputes ``softmax(z/τ)`` per
    chunk: ``∂/∂z = (scatter(g) − p·Σ_u g_u) / τ``.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
        rows = _chunk_rows(z)
        out = torch.empty(ids.shape, dtype=torch.float32, device=z.device)
        bufs = _ChunkBuffers(z, rows, temperature)
        for s in range(0, z.shape[0], rows):
            logp = torch.log_softmax(bufs.scaled(s), dim=-1, out=bufs.work(s))
            out[s : s + rows] = logp.gather(1, ids[s : s + rows])
        ctx.save_for_backward(z, ids)
        ctx.temperature, ctx.rows = temperature, rows
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        z, ids = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.empty_like(z)
        g = g / ctx.temperature
        coef = -g.sum(1, keepdim=True)
        bufs = _ChunkBuffers(z, rows, ctx.temperature)
        for s in range(0, z.shape[0], rows):
            e = s + rows
            p = torch.softmax(bufs.scaled(s), dim=-1, out=bufs.work(s))
            if grad.dtype == torch.float32:  # write straight into the gradient
                torch.mul(p, coef[s:e], out=grad[s:e]).scatter_add_(1, ids[s:e], g[s:e])
            else:  # combine in fp32, round once
                grad[s:e] = p.mul_(coef[s:e]).scatter_add_(1, ids[s:e], g[s:e])
        return grad, None, None


class _ChunkBuffers:
    """Reused fp32 row buffers (no allocation per chunk): ``z[s:s+rows] / τ`` and a work area."""

    def __init__(self, z: torch.Tensor, rows: int, temperature: float):
        self.z, self.rows, self.temperature = z, min(rows, z.shape[0]), temperature
        shape = (self.rows, z.shape[1])
        self._work = torch.empty(shape, dtype=torch.float32, device=z.device)
        exact = z.dtype == torch.float32 and temperature == 1.0
        self._conv = None if exact else torch.empty(shape, dtype=torch.float32, device=z.device)

    def scaled(self, s: int) -> torch.Tensor:
        src = self.z[s : s + self.rows]
        if self._conv is None:
            return src
        conv = self._conv[: src.shape[0]].copy_(src)
        return conv.div_(self.temperature) if self.temperature != 1.0 else conv

    def work(self, s: int) -> torch.Tensor:
        return self._work[: min(self.rows, self.z.shape[0] - s)]


def gather_log_probs(logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``float32[..., U]`` student log-probabilities ``log softmax(z/τ)`` at ``ids[..., U]``.

    Differentiable with respect to ``logits[..., V]`` without keeping a ``[..., V]`` log-softmax
    or an fp32 copy of low-precision logits (see module docstring).
    """
    v, u = logits.shape[-1], ids.shape[-1]
    logp = _GatherLogSoftmax.apply(logits.reshape(-1, v), ids.reshape(-1, u), float(temperature))
    return logp.view(*ids.shape)


LogProbs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool, bool],
                    tuple[torch.Tensor | None, torch.Tensor | None]]
"""``log_probs(logits[N,V], ids[N,U], label_ids[N,1], τ, need_ce, need_kd)``: ``(log softmax(z/τ)[ids]
float32[N,U], log softmax(z)[labels] float32[N])``, ``None`` for a term not needed."""


def plain_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, label_ids: torch.Tensor, temperature: float, need_ce: bool,
    need_kd: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The :data:`LogProbs` of the plain path, through :func:`gather_log_probs`."""
    if need_ce and need_kd and temperature == 1.0:  # one pass over V for both terms
        logp_all = gather_log_probs(logits, torch.cat([ids, label_ids], 1))
        return logp_all[:, :-1], logp_all[:, -1]
    logp = gather_log_probs(logits, ids, temperature=temperature) if need_kd else None
    return logp, (gather_log_probs(logits, label_ids)[:, 0] if need_ce else None)


def check_impl(impl: str) -> None:
    """Refuse a student side other than :data:`IMPLS` (``plain``, ``compiled``)."""
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {', '.join(IMPLS)}; found {impl!r}")


def log_probs_impl(impl: str, device: torch.device) -> LogProbs:
    """The student side for ``impl``: ``plain``, or ``compiled`` (:mod:`logitcache.train.losses_fused`) where
    ``torch.compile`` works on ``device`` (else the plain one, after one warning)."""
    check_impl(impl)
    if impl == "compiled":
        from .losses_fused import compile_works, compiled_log_probs

        if compile_works(device):
            return compiled_log_probs
    return plain_log_probs
