"""Direct, obviously-correct builders of SparseTargets from a dense teacher ``t[T, V]`` (tests only)."""

from __future__ import annotations

import torch

from logitcache.targets import SparseTargets

# every device the device-parametrised tests run on: CPU always, CUDA where present (no skip noise without it)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


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


def _draw(q: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lengths int32[T], ids int32[P] ascending per position, counts int32[P])`` of n draws from q."""
    draws = torch.multinomial(q, n, replacement=True, generator=gen)
    counts = torch.zeros(q.shape, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    present = counts > 0
    ids = present.nonzero()[:, 1]  # row-major: ascending ids within each position
    return present.sum(1).to(torch.int32), ids.to(torch.int32), counts[present].to(torch.int32)


def build_sample(t: torch.Tensor, n: int, gen: torch.Generator, temperature: float = 1.0) -> SparseTargets:
    """RS-KD: n draws from ``q ∝ t^(1/τ)``; weights ``t/q`` when ``τ != 1``."""
    q = t.double() ** (1.0 / temperature)
    q = q / q.sum(-1, keepdim=True)
    lengths, ids, counts = _draw(q, n, gen)
    weights = None
    if temperature != 1.0:
        pos = torch.repeat_interleave(torch.arange(t.shape[0]), lengths.long())
        weights = (t.double()[pos, ids.long()] / q[pos, ids.long()]).float()
    return SparseTargets(
        method="sample", sample_lengths=lengths, sample_ids=ids, sample_counts=counts,
        sample_weights=weights, num_samples=n,
    )


def build_hybrid(t: torch.Tensor, k: int, n: int, gen: torch.Generator) -> SparseTargets:
    """Exact top-k head plus n draws from the renormalised tail."""
    head = build_topk(t, k)
    tail = t.double().scatter(1, head.head_ids.long(), 0.0)
    lengths, ids, counts = _draw(tail / tail.sum(-1, keepdim=True), n, gen)
    return SparseTargets(
        method="hybrid", head_ids=head.head_ids, head_logprobs=head.head_logprobs, tail_mass=head.tail_mass,
        sample_lengths=lengths, sample_ids=ids, sample_counts=counts, num_samples=n,
    )


def build(method: str, t: torch.Tensor, gen: torch.Generator, *, k: int = 5, n: int = 50) -> SparseTargets:
    if method == "topk":
        return build_topk(t, k)
    if method == "sample":
        return build_sample(t, n, gen)
    if method == "hybrid":
        return build_hybrid(t, k, n, gen)
    if method == "full":
        return build_full(t)
    raise ValueError(method)


def make_items(teacher: torch.Tensor, lengths: list[int], method: str, seed: int = 0, **kw) -> list[dict]:
    """One item per sequence (first ``lengths[b]`` positions of ``teacher[b]``)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for b, n_pos in enumerate(lengths):
        t = teacher[b, :n_pos]
        labels = torch.multinomial(t, 1, generator=gen)[:, 0]
        input_ids = torch.randint(0, t.shape[-1], (n_pos,), generator=gen)
        items.append({"seq_id": 100 + b, "input_ids": input_ids, "labels": labels,
                      "targets": build(method, t, gen, **kw)})
    return items
