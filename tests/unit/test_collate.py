"""collate(): shapes, padding, and per-position equality with SparseTargets.estimate()."""

from __future__ import annotations

import pytest
import torch
from helpers import make_items

from logitcache.errors import TargetsError
from logitcache.testing.targets import build_sample
from logitcache.train.collate import collate
from logitcache.targets import SparseTargets

V = 37
LENGTHS = [6, 11, 1]


def _teacher(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(len(LENGTHS), max(LENGTHS), V, generator=gen), -1)


def _entries(batch: dict, b: int, pos: int) -> list[tuple[int, float]]:
    m = batch["target_mask"][b, pos]
    return list(zip(batch["target_ids"][b, pos][m].tolist(), batch["target_probs"][b, pos][m].tolist()))


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid", "full"])
def test_collate_matches_estimate(method: str) -> None:
    items = make_items(_teacher(), LENGTHS, method, k=4, n=20)
    batch = collate(items, pad_id=7, ignore_index=-1)
    b, t = len(items), max(LENGTHS)
    counts = [int(it["targets"].ids_per_position().max()) for it in items]
    u = max(counts)
    assert batch["input_ids"].shape == (b, t) and batch["input_ids"].dtype == torch.int64
    assert batch["labels"].shape == (b, t) and batch["attention_mask"].shape == (b, t)
    assert batch["target_ids"].shape == (b, t, u) and batch["target_ids"].dtype == torch.int64
    assert batch["target_probs"].dtype == torch.float32 and batch["target_mask"].dtype == torch.bool
    assert batch["target_tail_mass"].shape == (b, t)
    assert batch["seq_ids"].tolist() == [100, 101, 102]
    assert batch["target_method"] == method
    assert batch["target_head_size"] == {"topk": 4, "sample": 0, "hybrid": 4, "full": V}[method]
    assert batch["target_num_samples"] == {"topk": 0, "sample": 20, "hybrid": 20, "full": 0}[method]
    for row, (item, n) in enumerate(zip(items, LENGTHS)):
        tg: SparseTargets = item["targets"]
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert (batch["input_ids"][row, n:] == 7).all() and (batch["labels"][row, n:] == -1).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (t - n)
        assert not batch["target_mask"][row, n:].any() and (batch["target_probs"][row, n:] == 0).all()
        expected_tail = tg.tail_mass if method in ("topk", "hybrid") else torch.zeros(n)
        assert torch.equal(batch["target_tail_mass"][row, :n], expected_tail.float())
        assert (batch["target_tail_mass"][row, n:] == 0).all()
        offsets, ids, probs = tg.estimate()
        for pos in range(n):
            got = _entries(batch, row, pos)
            lo, hi = int(offsets[pos]), int(offsets[pos + 1])
            want = list(zip(ids[lo:hi].tolist(), probs[lo:hi].tolist()))
            assert sorted(got) == sorted(want)
            assert len(got) == len(set(i for i, _ in got))
            if tg.has_head:  # head first, in stored (descending-probability) order
                k = tg.head_ids.shape[1]
                assert [i for i, _ in got[:k]] == tg.head_ids[pos].tolist()
                hp = [p for _, p in got[:k]]
                assert hp == sorted(hp, reverse=True)
            # entries beyond a position's own count are padding
            assert not batch["target_mask"][row, pos, hi - lo :].any()
            assert (batch["target_probs"][row, pos, hi - lo :] == 0).all()


def test_collate_weighted_sample_and_int32_inputs() -> None:
    teacher = _teacher(1)
    gen = torch.Generator().manual_seed(3)
    items = [
        {"seq_id": i, "input_ids": torch.arange(n, dtype=torch.int32), "labels": torch.arange(n, dtype=torch.int32),
         "targets": build_sample(teacher[i, :n], 30, gen, temperature=1.5)}
        for i, n in enumerate(LENGTHS)
    ]
    batch = collate(items)
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    for row, (item, n) in enumerate(zip(items, LENGTHS)):
        offsets, ids, probs = item["targets"].estimate()
        assert item["targets"].sample_weights is not None
        for pos in range(n):
            lo, hi = int(offsets[pos]), int(offsets[pos + 1])
            assert _entries(batch, row, pos) == list(zip(ids[lo:hi].tolist(), probs[lo:hi].tolist()))
    assert (batch["labels"][0, LENGTHS[0]:] == -100).all() and (batch["input_ids"][0, LENGTHS[0]:] == 0).all()


def test_collate_u_is_batch_max() -> None:
    items = make_items(_teacher(2), LENGTHS, "sample", n=40)
    batch = collate(items)
    per_pos = [int(c) for it in items for c in it["targets"].ids_per_position()]
    assert batch["target_ids"].shape[-1] == max(per_pos)
    assert int(batch["target_mask"].sum()) == sum(per_pos)


def test_collate_rejects_mixed_methods_and_bad_lengths() -> None:
    teacher = _teacher()
    mixed = make_items(teacher, LENGTHS[:1], "topk", k=4) + make_items(teacher, LENGTHS[:1], "sample", n=5)
    with pytest.raises(TargetsError, match="share method"):
        collate(mixed)
    k_mismatch = make_items(teacher, LENGTHS[:1], "topk", k=4) + make_items(teacher, LENGTHS[:1], "topk", k=3)
    with pytest.raises(TargetsError, match="share method"):
        collate(k_mismatch)
    bad = make_items(teacher, [5], "topk", k=4)
    bad[0]["labels"] = bad[0]["labels"][:4]
    with pytest.raises(TargetsError, match="positions"):
        collate(bad)
    with pytest.raises(TargetsError, match="at least one"):
        collate([])
