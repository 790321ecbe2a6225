"""Sparse targets for tests: direct, obviously-correct builders from a dense teacher ``t[T, V]``,
random rows (tokens plus targets), the order decoding promises, and exact comparison."""

from __future__ import annotations

import numpy as np
import torch

from ..choices import METHODS
from ..errors import ConfigError
from ..targets import SparseTargets


def build_topk(t: torch.Tensor, k: int) -> SparseTargets:
    order = torch.argsort(t, dim=-1, descending=True)
    head = order[:, :k]
    tail = t.gather(1, order[:, k:]).sum(-1)
    return SparseTargets(
        method="topk",
        head_ids=head.to(torch.int32),
        head_logprobs=t.gather(1, head).log().float(),
        tail_mass=tail.float(),
    )


def build_full(t: torch.Tensor) -> SparseTargets:
    order = torch.argsort(t, dim=-1, descending=True)
    return SparseTargets(
        method="full",
        head_ids=order.to(torch.int32),
        head_logprobs=t.gather(1, order).log().float(),
        tail_mass=torch.zeros(t.shape[0]),
    )


def _draw(q: torch.Tensor, n: int, gen: torch.Generator,
          totals: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lengths int32[T], ids int32[P] ascending per position, counts int32[P])`` of n draws from q (or, with
    ``totals`` int[T], of the first ``totals[t]`` of ``max(totals)`` draws at position t)."""
    width = n if totals is None else int(totals.max())
    draws = torch.multinomial(q, width, replacement=True, generator=gen)
    kept = torch.ones_like(draws) if totals is None else (torch.arange(width) < totals[:, None]).long()
    counts = torch.zeros(q.shape, dtype=torch.int64).scatter_add_(1, draws, kept)
    present = counts > 0
    ids = present.nonzero()[:, 1]  # row-major: ascending ids within each position
    return present.sum(1).to(torch.int32), ids.to(torch.int32), counts[present].to(torch.int32)


def build_sample(t: torch.Tensor, n: int, gen: torch.Generator, temperature: float = 1.0,
                 totals: torch.Tensor | None = None) -> SparseTargets:
    """RS-KD: n draws from ``q ∝ t^(1/τ)``; weights ``t/q`` when ``τ != 1``; with ``totals`` (an adaptive budget
    of mean ``n``) ``totals[t]`` draws at position t."""
    q = t.double() ** (1.0 / temperature)
    q = q / q.sum(-1, keepdim=True)
    lengths, ids, counts = _draw(q, n, gen, totals)
    weights = None
    if temperature != 1.0:
        pos = torch.repeat_interleave(torch.arange(t.shape[0]), lengths.long())
        weights = (t.double()[pos, ids.long()] / q[pos, ids.long()]).float()
    return SparseTargets(
        method="sample", sample_lengths=lengths, sample_ids=ids, sample_counts=counts,
        sample_weights=weights, num_samples=n, sample_totals=_totals(totals),
    )


def build_hybrid(t: torch.Tensor, k: int, n: int, gen: torch.Generator,
                 totals: torch.Tensor | None = None) -> SparseTargets:
    """Exact top-k head plus n draws (``totals[t]`` with ``totals``) from the renormalised tail."""
    head = build_topk(t, k)
    tail = t.double().scatter(1, head.head_ids.long(), 0.0)
    lengths, ids, counts = _draw(tail / tail.sum(-1, keepdim=True), n, gen, totals)
    return SparseTargets(
        method="hybrid", head_ids=head.head_ids, head_logprobs=head.head_logprobs, tail_mass=head.tail_mass,
        sample_lengths=lengths, sample_ids=ids, sample_counts=counts, num_samples=n, sample_totals=_totals(totals),
    )


def _totals(totals: torch.Tensor | None) -> torch.Tensor | None:
    return None if totals is None else totals.to(torch.int32)


def build(method: str, t: torch.Tensor, gen: torch.Generator, *, k: int = 5, n: int = 50) -> SparseTargets:
    """``method``'s targets of ``t`` (k head entries, n draws)."""
    if method == "topk":
        return build_topk(t, k)
    if method == "sample":
        return build_sample(t, n, gen)
    if method == "hybrid":
        return build_hybrid(t, k, n, gen)
    if method == "full":
        return build_full(t)
    raise ConfigError(f"method must be one of {', '.join(METHODS)}; found {method!r}")


def canonical(t: SparseTargets) -> SparseTargets:
    """Head by (−logp, id), samples by id: the order decode_row promises (per-position fields as they are)."""
    head = {}
    if t.head_ids is not None:
        ids, lp = t.head_ids.numpy(), t.head_logprobs.numpy()
        o = np.lexsort((ids, -lp), axis=1)
        head = dict(head_ids=torch.from_numpy(np.take_along_axis(ids, o, 1)),
                    head_logprobs=torch.from_numpy(np.take_along_axis(lp, o, 1)), tail_mass=t.tail_mass)
    sample = {}
    if t.sample_ids is not None:
        sample = dict(sample_lengths=t.sample_lengths, sample_ids=t.sample_ids, sample_counts=t.sample_counts,
                      sample_weights=t.sample_weights, sample_totals=t.sample_totals)
    return SparseTargets(method=t.method, num_samples=t.num_samples, label_logprobs=t.label_logprobs, **head, **sample)


def random_row(method: str, num_positions: int, vocab: int, seed: int, k: int = 5, n: int = 50,
               weighted: bool = False) -> tuple[np.ndarray, SparseTargets]:
    """``(tokens int32[T + 1], targets)`` for ``T = num_positions``: labels drawn from a random teacher,
    targets built from it by ``method`` (random importance weights when ``weighted``)."""
    gen = torch.Generator().manual_seed(seed)
    # the teacher from ``seed`` too (torch's Dirichlet draws from the global generator, which made a row depend on
    # the tests run before it)
    t = torch.from_numpy(np.random.default_rng(seed).dirichlet(np.full(vocab, 0.3), num_positions)).float()
    t = (t + 1e-9) / (t + 1e-9).sum(-1, keepdim=True)
    labels = torch.multinomial(t, 1, generator=gen)[:, 0]
    tokens = np.concatenate([[int(torch.randint(0, vocab, (1,), generator=gen))], labels.numpy()]).astype(np.int32)
    targets = build(method, t, gen, k=min(k, vocab), n=n)
    if weighted and method == "sample":
        w = torch.rand(targets.sample_ids.shape, generator=gen)
        targets = SparseTargets(**{**targets.__dict__, "sample_weights": w})
    return tokens, targets


def assert_equal(a: SparseTargets, b: SparseTargets) -> None:
    """Every field of ``a`` equals ``b``'s exactly (compared in ``b``'s dtype; a NaN equals a NaN in the same place,
    as a damaged float decodes by both decoders); None where ``b`` has None."""
    for name in ("head_ids", "head_logprobs", "tail_mass", "sample_lengths", "sample_ids", "sample_counts",
                 "sample_weights", "label_logprobs", "sample_totals"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x.to(y.dtype), y, rtol=0, atol=0, equal_nan=True, msg=name)
