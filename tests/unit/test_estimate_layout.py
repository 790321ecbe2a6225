"""SparseTargets.estimate lays each position's entries out head first, then its sampled entries, against a
position-by-position reference — for hybrid targets (positions with no sampled entry included, weights,
adaptive totals) by the numpy path the CPU takes and by the torch path other devices take; so do its two
parts (estimate_parts) and a batch laid out from them."""

from __future__ import annotations

import pytest
import torch

from logitcache.targets import SparseTargets, _interleave
from logitcache.train.collate import dense_targets


def _hybrid(seed: int, positions: int = 11, k: int = 3, weighted: bool = False, adaptive: bool = False):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (positions,), generator=gen)
    lengths[0] = 0  # a position whose draws all fell in the head
    e = int(lengths.sum())
    totals = torch.randint(8, 30, (positions,), generator=gen) if adaptive else None
    return SparseTargets(method="hybrid", num_samples=20,
                         head_ids=torch.randint(0, 500, (positions, k), generator=gen, dtype=torch.int64).to(torch.int32),
                         head_logprobs=-torch.rand(positions, k, generator=gen) * 5,
                         tail_mass=torch.rand(positions, generator=gen),
                         sample_lengths=lengths.to(torch.int32),
                         sample_ids=torch.randint(500, 900, (e,), generator=gen).to(torch.int32),
                         sample_counts=torch.randint(1, 5, (e,), generator=gen).to(torch.int32),
                         sample_weights=torch.rand(e, generator=gen) + 0.5 if weighted else None,
                         sample_totals=totals.to(torch.int32) if adaptive else None)


def _reference(t: SparseTargets):
    est, ids, probs, offsets, at = t.sample_estimate(), [], [], [0], 0
    for p in range(t.num_positions):
        n = int(t.sample_lengths[p])
        ids += t.head_ids[p].tolist() + t.sample_ids[at:at + n].tolist()
        probs += t.head_logprobs[p].exp().tolist() + est[at:at + n].tolist()
        offsets.append(offsets[-1] + t.head_ids.shape[1] + n)
        at += n
    return torch.tensor(offsets), torch.tensor(ids), torch.tensor(probs, dtype=torch.float32)


@pytest.mark.parametrize("weighted, adaptive", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hybrid_estimate_is_head_first_then_samples_position_by_position(seed, weighted, adaptive):
    t = _hybrid(seed, weighted=weighted, adaptive=adaptive)
    offsets, ids, probs = t.estimate()
    want_off, want_ids, want_probs = _reference(t)
    assert torch.equal(offsets, want_off)
    assert ids.dtype == torch.int64 and torch.equal(ids, want_ids)
    assert probs.dtype == torch.float32 and torch.equal(probs, want_probs)


@pytest.mark.parametrize("seed", [0, 3])
def test_the_numpy_and_the_torch_interleave_agree(seed):
    t = _hybrid(seed, positions=40, k=5)
    offsets, _, _ = t.estimate()
    lengths = t.sample_lengths.to(torch.int64) + 5
    pairs = [(t.head_ids.to(torch.int64), t.sample_ids.to(torch.int64)), (t.head_logprobs, t.sample_estimate())]
    by_numpy = _interleave(offsets, lengths, 5, pairs, by_numpy=True)
    by_torch = _interleave(offsets, lengths, 5, pairs, by_numpy=False)
    for a, b in zip(by_numpy, by_torch):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(by_torch[0], _reference(t)[1])


@pytest.mark.parametrize("weighted, adaptive", [(False, False), (True, True)])
@pytest.mark.parametrize("seed", [4, 5])
def test_estimate_parts_are_the_head_and_the_samples_and_lay_out_as_the_estimate(seed, weighted, adaptive):
    """The two parts against the position-by-position reference, and a batch laid out from them (cells with gaps
    between them, positions without a sampled entry) holds at every cell exactly that position's entries, in order."""
    t = _hybrid(seed, positions=13, k=4, weighted=weighted, adaptive=adaptive)
    head_ids, head_probs, offsets, ids, probs = t.estimate_parts()
    assert head_ids.dtype == torch.int64 and torch.equal(head_ids, t.head_ids.to(torch.int64))
    assert head_probs.dtype == torch.float32 and torch.equal(head_probs, t.head_logprobs.exp())
    assert torch.equal(offsets, t.sample_offsets()) and torch.equal(ids, t.sample_ids.to(torch.int64))
    assert probs.dtype == torch.float32 and torch.equal(probs, t.sample_estimate())
    want_off, want_ids, want_probs = _reference(t)
    cells = torch.arange(t.num_positions) * 3 + 1  # cells 0, 2, 3, 5, ... hold nothing
    size, u = int(cells[-1]) + 2, int((want_off[1:] - want_off[:-1]).max())
    batch = dense_targets([t], cells, (1, size))
    assert batch["target_ids"].shape == (1, size, u)
    for cell in range(size):
        got_ids, got_probs, mask = (batch[k][0, cell] for k in ("target_ids", "target_probs", "target_mask"))
        if cell in cells.tolist():
            p = cells.tolist().index(cell)
            lo, hi = int(want_off[p]), int(want_off[p + 1])
            assert mask.tolist() == [True] * (hi - lo) + [False] * (u - hi + lo)
            assert torch.equal(got_ids[:hi - lo], want_ids[lo:hi])
            assert torch.equal(got_probs[:hi - lo], want_probs[lo:hi])
            assert not got_ids[hi - lo:].any() and not got_probs[hi - lo:].any()
        else:
            assert not mask.any() and not got_ids.any() and not got_probs.any()
