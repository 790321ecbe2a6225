"""The head set is canonical at exact ties: among equal values the smallest ids enter first, on every
device, whatever the input shape or chunking (docs/format.md, "Decoded rows are canonical")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.capture import sparsify as sp
from logitcache.capture.sparsify import draw_uniforms, hybrid, topk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_head(x: torch.Tensor, k: int) -> np.ndarray:
    """Ids ``int64[T, k]`` by (value descending, id ascending), one row at a time with numpy."""
    values = x.float().numpy()
    out = []
    for row in values:
        order = np.lexsort((np.arange(row.size), -row))  # last key first: value desc, then id asc
        out.append(order[:k])
    return np.stack(out)


def tied_logits(kind: str, t: int, v: int, seed: int) -> torch.Tensor:
    """Logits with many exact ties, several of them across the k boundary."""
    g = torch.Generator().manual_seed(seed)
    if kind == "integers":  # a handful of distinct values: ties everywhere
        return torch.randint(-4, 4, (t, v), generator=g).float()
    if kind == "bf16":  # real-looking logits rounded to bfloat16 (what a bf16 teacher emits)
        x = 4 + torch.randn(t, v, generator=g) * 0.25  # bf16 spacing near 4 is 1/32: ties are common
        x[torch.arange(t), torch.randint(0, v, (t,), generator=g)] += 2
        return x.to(torch.bfloat16)
    if kind == "plateau":  # a few clear winners, then one long plateau of equal values
        x = torch.full((t, v), -1.0)
        for r in range(t):
            winners = torch.randperm(v, generator=g)[: r % 6]
            x[r, winners] = 5.0 + torch.arange(winners.numel()).float()
        return x
    raise ValueError(kind)


SHAPES = [(300, 5), (4096, 8), (5001, 16), (6000, 1), (3000, 11)]  # small path, whole blocks, ragged, k=1


def head_mismatches(fn, kind: str, v: int, k: int, device: str) -> int:
    x = tied_logits(kind, 33, v, seed=v + k)
    got = fn(x.to(device), k).head_ids.to("cpu").long().numpy()
    return int((got != reference_head(x, k)).any(1).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["integers", "bf16", "plateau"])
@pytest.mark.parametrize("v, k", SHAPES)
def test_topk_head_is_the_smallest_id_choice(v, k, kind, device):
    assert head_mismatches(topk, kind, v, k, device) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["integers", "bf16", "plateau"])
@pytest.mark.parametrize("v, k", SHAPES)
def test_hybrid_head_is_the_smallest_id_choice(v, k, kind, device):
    def head(x, k):
        return hybrid(x, k, 20, draw_uniforms(0, 1, x.shape[0], 20).to(x.device))

    assert head_mismatches(head, kind, v, k, device) == 0


def test_ties_really_cross_the_boundary():
    """The planted data is discriminating: in many rows the k-th and (k+1)-th values are equal."""
    for v, k in SHAPES:
        x = tied_logits("bf16", 33, v, seed=v + k).float()
        sorted_vals = x.sort(1, descending=True).values
        assert k == 1 or int((sorted_vals[:, k - 1] == sorted_vals[:, k]).sum()) >= 10, (v, k)


@pytest.mark.parametrize("kind", ["integers", "bf16", "plateau"])
def test_a_planted_regression_fails(monkeypatch, kind):
    """With the tie rule dropped (plain ``torch.topk``), the canonical check catches it."""
    def any_tie_order(y, k):
        vals, idx = torch.topk(y, k, dim=1)
        return vals, idx

    monkeypatch.setattr(sp, "_topk_by_id", any_tie_order)
    assert sum(head_mismatches(topk, kind, v, k, "cpu") for v, k in SHAPES) > 0


def _fields(t):
    return {n: getattr(t, n) for n in ("head_ids", "head_logprobs", "tail_mass", "sample_lengths", "sample_ids",
                                       "sample_counts")}


@pytest.mark.parametrize("method", ["topk", "hybrid"])
@pytest.mark.parametrize("kind", ["integers", "bf16"])
def test_chunked_and_whole_sparsify_give_the_same_targets(method, kind):
    x = tied_logits(kind, 40, 5001, seed=7)
    u = draw_uniforms(0, 3, 40, 20)

    def run(a, b):
        return topk(x[a:b], 16) if method == "topk" else hybrid(x[a:b], 16, 20, u[a:b])

    whole = run(0, 40)
    parts = [run(a, b) for a, b in [(0, 1), (1, 17), (17, 40)]]
    for name, value in _fields(whole).items():
        if value is None:
            continue
        joined = torch.cat([getattr(p, name) for p in parts])  # every field is flat per position
        assert torch.equal(value, joined), name
