"""Random draws for the sampling sparsifiers: the uniforms, and how many draws each position gets.

**Uniforms** (:func:`draw_uniforms`): row ``t`` of a sequence's ``float64[T, W]`` depends only on
``(seed, seq_id, t, W)``, so batch size, chunking, restarts and workers never change a draw.

**Budgets** (``sparsify.allocation``, docs/capture.md "Adaptive sample budgets"). ``fixed`` gives every
position ``N`` draws. ``variance`` spends the same ``N·T`` draws of a sequence of ``T`` positions where
they remove the most variance. One position's RS-KD estimate ``t̂ = c/N_t`` has summed variance
``Σ_i Var t̂_i = V_t / N_t`` with ``V_t = 1 − Σ_i p_i²`` (for hybrid's tail, ``m² (1 − Σ_i q_i²)``, ``q``
the renormalised tail), and that is also the summed variance of the KD gradient ``p_student − t̂``.
Minimising ``Σ_t V_t / N_t`` subject to ``Σ_t N_t = N·T`` (Lagrange: ``V_t / N_t² = λ``) gives
``N_t ∝ sqrt(V_t)`` — not ``∝ V_t``, which over-serves the broad positions. With the bounds
``1 <= N_t <= cap`` the optimum is ``N_t = clip(λ·sqrt(V_t), 1, cap)`` (water filling);
:func:`allocate` finds ``λ`` by bisection and rounds by largest remainder so the sum is exact. It reads
nothing but the sequence's own ``V``, so it is batch- and chunk-invariant and resumable. A position's
draws are the *first* ``N_t`` of its row of ``cap`` uniforms, so every draw is still an independent
draw from ``p`` and ``t̂_i = c_i / N_t`` stays unbiased (``N_t`` is fixed by ``p`` before any draw).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace

import torch

from ..errors import ConfigError, TargetsError
from ..targets import SparseTargets, concat_targets

UNIFORM_ROWS = 64
"""Rows of uniforms drawn from one generator (see :func:`draw_uniforms`)."""
BISECTION_STEPS = 100  # float64 λ to far below one draw over any realistic sequence
_MASK63 = (1 << 63) - 1


def sequence_seed(seed: int, seq_id: int) -> int:
    """Stable 63-bit seed for sequence ``seq_id`` under global ``seed`` (blake2b, not ``hash()``)."""
    digest = hashlib.blake2b(f"logitcache/seq/{int(seed)}/{int(seq_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def _block_seed(seq_seed: int, block: int, num_samples: int) -> int:
    key = f"logitcache/uniforms/{seq_seed}/{num_samples}/{block}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & _MASK63


def draw_uniforms(seed: int, seq_id: int, num_positions: int, num_samples: int) -> torch.Tensor:
    """``float64[T, N]`` uniforms in ``[0, 1)`` for one sequence of ``T = num_positions``.

    Rows are drawn in groups of :data:`UNIFORM_ROWS` positions, each group from its own
    ``torch.Generator`` seeded by ``(sequence_seed(seed, seq_id), N, group)``. Hence row ``t``
    depends only on ``(seed, seq_id, t, N)``: not on ``T`` and not on anything global. (The capture
    loop draws for the full sequence and slices rows ``[a:b]`` per position chunk; an adaptive budget
    draws ``N = cap`` columns and uses a prefix of each row.)
    """
    if num_positions < 0 or num_samples < 1:
        raise ConfigError(f"draw_uniforms needs num_positions >= 0 and num_samples >= 1; found "
                          f"num_positions={num_positions}, num_samples={num_samples}")
    seq_seed = sequence_seed(seed, seq_id)
    out = torch.empty(num_positions, num_samples, dtype=torch.float64)
    gen = torch.Generator(device="cpu")
    for g, start in enumerate(range(0, num_positions, UNIFORM_ROWS)):
        gen.manual_seed(_block_seed(seq_seed, g, num_samples))
        group = torch.rand(UNIFORM_ROWS, num_samples, generator=gen, dtype=torch.float64)
        stop = min(start + UNIFORM_ROWS, num_positions)
        out[start:stop] = group[: stop - start]
    return out


def allocate(variance: torch.Tensor, mean: int, cap: int) -> torch.Tensor:
    """``int32[T]`` draws per position: ``1 <= N_t <= cap``, ``Σ N_t = mean·T`` exactly, ``N_t ≈ clip(λ·sqrt(V_t),
    1, cap)`` (the optimum of ``Σ V_t/N_t``, module docstring). ``variance`` float64[T] (negative rounding
    clamped to 0). All-zero variance, or too few positions with variance to take the budget, spreads the
    rest evenly. Rounding: floors, then +1 (or −1) by largest (smallest) fractional part, ties by position."""
    if not 1 <= mean <= cap:
        raise ConfigError(f"an adaptive budget needs 1 <= mean draws <= cap; found mean={mean}, cap={cap}")
    score = variance.detach().to("cpu", torch.float64).clamp(min=0).sqrt()
    t, budget = score.numel(), mean * score.numel()
    if t == 0 or not bool((score > 0).any()):
        return torch.full((t,), mean, dtype=torch.int32)
    lo, hi = 0.0, cap / float(score[score > 0].min())

    def spread(lam: float) -> torch.Tensor:
        return (lam * score).clamp(1.0, float(cap))

    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(spread(mid).sum()) < budget else (lo, mid)
    x = spread(hi)
    zero = score == 0
    if float(x.sum()) < budget:  # every position with variance is at the cap: the rest is spread evenly
        x[zero] = (budget - cap * int((~zero).sum())) / int(zero.sum())
    return _round_to(x, budget, cap)


def _round_to(x: torch.Tensor, budget: int, cap: int) -> torch.Tensor:
    """Integers in ``[1, cap]`` near ``x`` (float64[T], within those bounds) summing to ``budget``."""
    base = x.floor().clamp(1, cap)
    frac = x - base
    short = budget - int(base.sum())
    if short > 0:  # the largest fractional parts among those below the cap get one more
        order = torch.sort(torch.where(base < cap, -frac, float("inf")), stable=True).indices[:short]
        base[order] += 1
    elif short < 0:  # float rounding left the floors above the budget: the smallest parts above 1 give one back
        order = torch.sort(torch.where(base > 1, frac, float("inf")), stable=True).indices[:-short]
        base[order] -= 1
    out = base.to(torch.int32)
    if int(out.sum()) != budget or int(out.min()) < 1 or int(out.max()) > cap:
        raise TargetsError(f"could not round an adaptive budget of {budget} draws over {x.numel()} positions "
                           f"within [1, {cap}] (found sum {int(out.sum())}); this is a bug, please report it")
    return out


def run_lengths(draws: torch.Tensor, row_len: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run-length encode the first ``row_len[t]`` (int64[T]) entries of each row of ``draws`` int64[T, W],
    ascending within those entries (rows with ``row_len`` 0 yield nothing).

    Returns ``(lengths int32[T], ids int64[P], counts int32[P], rows int64[P])``.
    """
    t, n = draws.shape
    new = torch.ones(t, n, dtype=torch.bool, device=draws.device)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    new &= torch.arange(n, device=draws.device)[None, :] < row_len[:, None]
    starts = new.reshape(-1).nonzero().squeeze(1)
    rows = starts // n
    ends = torch.cat([starts[1:], starts.new_full((1,), t * n)])
    ends = torch.minimum(ends, rows * n + row_len[rows])
    ids = draws.reshape(-1)[starts]
    return new.sum(1, dtype=torch.int32), ids, (ends - starts).to(torch.int32), rows


@dataclass(frozen=True)
class DrawnChunk:
    """One chunk of positions drawn for an adaptive budget, before the sequence's budget is known.

    ``draws`` int64[T, cap]: the ids of all ``cap`` uniforms of each row, in uniform order (so a prefix
    is a sample); ``variance`` float64[T] the variance one draw leaves (module docstring); ``valid``
    bool[T] the rows that draw at all (hybrid: a tail to sample); the head fields as in
    :class:`~logitcache.targets.SparseTargets` (hybrid), and ``label_logprobs`` (capture adds them)."""

    method: str
    draws: torch.Tensor
    variance: torch.Tensor
    valid: torch.Tensor
    head_ids: torch.Tensor | None = None
    head_logprobs: torch.Tensor | None = None
    tail_mass: torch.Tensor | None = None
    label_logprobs: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> DrawnChunk:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def sequence_targets(parts: list, mean: int) -> SparseTargets:
    """One sequence's targets from its chunks in position order: :func:`concat_targets` of fixed-budget
    parts, or, for :class:`DrawnChunk` parts, the budget :func:`allocate`\\ d over the whole sequence
    (``mean`` draws per position, the cap being the chunks' width) and each position's first ``N_t`` draws."""
    if not parts or not isinstance(parts[0], DrawnChunk):
        return concat_targets(parts)

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values, 0)

    draws, valid = cat("draws"), cat("valid")
    cap = draws.shape[1]
    totals = allocate(cat("variance"), mean, cap)
    kept = torch.arange(cap)[None, :] < totals[:, None].to(torch.int64)
    ordered = torch.sort(torch.where(kept, draws, torch.iinfo(torch.int64).max), 1).values  # dropped draws last
    row_len = torch.where(valid, totals.to(torch.int64), 0)
    lengths, ids, counts, _ = run_lengths(ordered, row_len)
    return SparseTargets(parts[0].method, head_ids=cat("head_ids"), head_logprobs=cat("head_logprobs"),
                         tail_mass=cat("tail_mass"), sample_lengths=lengths, sample_ids=ids.to(torch.int32),
                         sample_counts=counts, num_samples=mean, label_logprobs=cat("label_logprobs"),
                         sample_totals=totals)


__all__ = ["DrawnChunk", "allocate", "draw_uniforms", "run_lengths", "sequence_seed", "sequence_targets"]
