"""The student side of the sparse KD losses through ``torch.compile``: ``kd_loss(..., impl="compiled")``.

The plain path (:func:`logitcache.train.losses.gather_log_probs`) computes ``log_softmax(z/τ)`` over
``z[N, V]`` in fp32 row chunks and gathers ``[N, U]`` values; its backward recomputes the softmax per
chunk and scatters. Here the two passes over ``[N, V]`` are compiled functions (inductor: Triton kernels
on a GPU, C++/OpenMP loops on the CPU), each one fused loop with no fp32 ``[N, V]`` buffer:

* forward: ``lse_g = logsumexp(z / τ_g)`` per row (a reduction reading ``z`` once, accumulating in
  fp32), then ``log p = z[ids] / τ − lse`` on the gathered ``[N, K]`` values only;
* backward: ``Σ_g softmax(z/τ_g) · c_g`` with ``c_g = −Σ_{k∈g} w_k`` written straight in ``z``'s
  dtype (one pointwise kernel; ``w_k = g_k / τ_k`` the incoming gradient), then the ``K`` gathered
  entries overwritten with their exact value ``dense + Σ_{k': id_k' = id_k} w_k'`` computed in fp32
  (duplicate ids summed; eager, ``[N, K]`` only), so every element is rounded once, as on the plain path.

*Groups*: the KD ids at the student temperature τ and the label at τ = 1 (the CE term) share one
pass: one group when τ = 1 or when one of the terms is off (``alpha`` 0 or 1), two otherwise. Peak
memory over the logits is the gradient itself; ``cross_entropy`` also keeps its ``[N, V]``
log-softmax.

*Fallback*: the first use on a device type runs the compiled pieces on a tiny input and compares
them with their eager forms; if compiling fails (no C++ compiler, no Triton, a backend error) or the
values differ, one ``RuntimeWarning`` names the cause and :func:`compile_works` answers ``False``:
the caller then takes the plain path, which computes the same function. Later recompiles (a new
dtype, a new number of groups) raise their error instead of changing the result silently.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["compile_works", "compiled_log_probs"]


# ---------------------------------------------------------------- the pieces (eager forms; compiled below)
def _lse(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``float32[N, G]``: ``logsumexp(z / τ_g)`` per row for each temperature ``tau[g]``."""
    zf = z.float()
    return torch.stack([torch.logsumexp(zf / tau[g], dim=-1) for g in range(tau.shape[0])], dim=-1)


def _mix(zf: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``Σ_g exp(zf / τ_g − lse_g) · c_g`` per row: the softmax part of the gradient, in fp32."""
    out = torch.exp(zf / tau[0] - lse[:, :1]) * coef[:, :1]
    for g in range(1, tau.shape[0]):
        out = out + torch.exp(zf / tau[g] - lse[:, g : g + 1]) * coef[:, g : g + 1]
    return out


def _dense(z: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The ``[N, V]`` gradient's softmax part, rounded once to ``z``'s dtype."""
    return _mix(z.float(), lse, coef, tau).to(z.dtype)


def _at_ids(zg: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
            tau: torch.Tensor) -> torch.Tensor:
    """The exact gradient at the gathered columns: softmax part + every ``w`` at an equal id, rounded once."""
    same = ids[:, :, None] == ids[:, None, :]
    return (_mix(zg.float(), lse, coef, tau) + (same * w[:, None, :]).sum(-1)).to(zg.dtype)


class _Kernels:
    """The two ``[N, V]`` passes through ``torch.compile`` (``dynamic=True``: one compile per dtype and number of
    groups serves every row count and V). ``_at_ids`` works on ``[N, K]`` only and stays eager."""

    def __init__(self, backend: Any = "inductor"):
        self.lse = torch.compile(_lse, dynamic=True, backend=backend)
        self.dense = torch.compile(_dense, dynamic=True, backend=backend)


_KERNELS = _Kernels()
_WORKS: dict[str, bool] = {}


# ---------------------------------------------------------------- autograd
class _CompiledGather(torch.autograd.Function):
    """``float32[N, K]``: ``log softmax(z / τ_{group_k})`` at ``ids[:, k]``, from ``z[N, V]`` (module docstring)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, ids: torch.Tensor, group: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        lse = _KERNELS.lse(z, tau)
        ctx.save_for_backward(z, ids, group, tau, lse)
        return z.gather(1, ids).float() / tau[group] - lse[:, group]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        z, ids, group, tau, lse = ctx.saved_tensors
        w = g / tau[group]
        coef = torch.zeros(lse.shape, dtype=torch.float32, device=z.device).index_add_(1, group, w).neg_()
        grad = _KERNELS.dense(z, lse, coef, tau)
        # index_put_ on the flat view, not scatter_: the CPU scatter_ of a bf16 tensor makes an fp32 copy of it
        flat = (ids + torch.arange(0, ids.shape[0] * z.shape[1], z.shape[1], device=z.device)[:, None]).view(-1)
        grad.view(-1).index_put_((flat,), _at_ids(z.gather(1, ids), ids, w, lse, coef, tau).view(-1))
        return grad, None, None, None


def compiled_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, label_ids: torch.Tensor, temperature: float, need_ce: bool,
    need_kd: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(log softmax(z/τ)[ids] float32[N, U], log softmax(z)[label_ids] float32[N])``, ``None`` for a term not
    needed; ``logits[N, V]``, ``ids int64[N, U]``, ``label_ids int64[N, 1]``. One pass over ``V`` each way."""
    cols = ([ids] if need_kd else []) + ([label_ids] if need_ce else [])
    two = need_kd and need_ce and temperature != 1.0
    all_ids = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
    group = torch.zeros(all_ids.shape[1], dtype=torch.int64, device=logits.device)
    tau = torch.full((2 if two else 1,), float(temperature if need_kd else 1.0), device=logits.device)
    if two:
        group[-1], tau[-1] = 1, 1.0
    logp = _CompiledGather.apply(logits, all_ids, group, tau)
    return (logp[:, : ids.shape[1]] if need_kd else None), (logp[:, -1] if need_ce else None)


# ---------------------------------------------------------------- availability
def compile_works(device: torch.device) -> bool:
    """Whether the compiled pieces run on ``device``'s type and agree with their eager forms. Probed once per
    device type (a tiny forward + backward); when not, one ``RuntimeWarning`` says why."""
    kind = device.type
    if kind not in _WORKS:
        try:
            problem = _probe(device)
        except Exception as exc:  # any failure to compile or run means: take the plain path
            exc = getattr(exc, "inner_exception", None) or exc  # the backend's own error, not dynamo's wrapper
            problem = f"compiling failed ({type(exc).__name__}: {(str(exc).strip() or '?').splitlines()[0][:300]})"
        if problem:
            warnings.warn(f"logitcache: impl='compiled' is unavailable on {kind}: {problem}; using the plain loss "
                          "(same values, plain speed). Check that torch.compile works here (a C++ compiler on the "
                          "CPU, Triton on a GPU).", RuntimeWarning, stacklevel=4)
        _WORKS[kind] = not problem
    return _WORKS[kind]


def _probe(device: torch.device) -> str:
    """Each compiled piece on a tiny input vs its eager form: ``""`` when they agree, else what differed."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 11, generator=gen).to(device)
    tau = torch.tensor([0.7, 1.0], device=device)
    lse = _lse(z, tau)
    coef = torch.randn(3, 2, generator=gen).to(device)
    pairs = {
        "logsumexp": (_KERNELS.lse(z, tau), lse),
        "softmax gradient": (_KERNELS.dense(z, lse, coef, tau), _dense(z, lse, coef, tau)),
    }
    bad = [name for name, (got, want) in pairs.items() if not torch.allclose(got, want, rtol=1e-5, atol=1e-6)]
    return f"the compiled {', '.join(bad)} differ from the eager values" if bad else ""
