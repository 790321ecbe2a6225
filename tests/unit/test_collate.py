"""collate(): shapes, padding, and per-position equality with SparseTargets.estimate(); items with a
loss mask and compact targets (a ``documents`` store) against a reference built position by position."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from helpers import make_items

from logitcache.errors import TargetsError
from logitcache.testing.targets import build, build_sample
import logitcache.train.collate as collate_module
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
            assert got == want  # the estimate's order: the head block, then the sampled entries
            assert len(got) == len(set(i for i, _ in got))
            if tg.has_head:  # head first, in stored (descending-probability) order
                k = tg.head_ids.shape[1]
                assert [i for i, _ in got[:k]] == tg.head_ids[pos].tolist()
                hp = [p for _, p in got[:k]]
                assert hp == sorted(hp, reverse=True)
            # entries beyond a position's own count are padding
            assert not batch["target_mask"][row, pos, hi - lo :].any()
            assert (batch["target_probs"][row, pos, hi - lo :] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_tail_mass_of_a_half_float_dtype_is_laid_out_as_float32(dtype) -> None:
    """The batch's tail mass is float32 whatever float dtype the items' targets carry (numpy has no bfloat16)."""
    items = make_items(_teacher(), LENGTHS, "hybrid", k=4, n=20)
    for item in items:
        item["targets"] = dataclasses.replace(item["targets"], tail_mass=item["targets"].tail_mass.to(dtype))
    batch = collate(items)
    assert batch["target_tail_mass"].dtype == torch.float32
    for row, (item, n) in enumerate(zip(items, LENGTHS)):
        assert torch.equal(batch["target_tail_mass"][row, :n], item["targets"].tail_mass.float())


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
    with pytest.raises(TargetsError, match=r"item 0 \(seq_id 100\): input_ids has shape \(5,\) and labels \(4,\)"):
        collate(bad)
    with pytest.raises(TargetsError, match="at least one"):
        collate([])


# -- loss masks and compact targets -------------------------------------------------------------------

MASKED_LENGTHS = [1, 7, 13, 2, 5, 9]


def _masked_items(method: str, seed: int = 0) -> list[dict]:
    """Items of odd lengths: a length-1 one with nothing trained, one with every position trained, one
    without loss_mask (full targets), one with a loss_mask and full targets, the rest with compact
    targets (``loss_mask.sum()`` positions, as a documents store yields them)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i, n in enumerate(MASKED_LENGTHS):
        mask = torch.rand(n, generator=gen) < 0.5
        mask = {0: torch.zeros(n, dtype=torch.bool), 1: torch.ones(n, dtype=torch.bool)}.get(i, mask)
        full = i in (2, 3)
        t = torch.softmax(2.0 * torch.randn(n if full else int(mask.sum()), V, generator=gen), -1)
        item = {"seq_id": 300 + i, "input_ids": torch.randint(0, V, (n,), generator=gen),
                "labels": torch.randint(0, V, (n,), generator=gen), "targets": build(method, t, gen, k=4, n=15)}
        if i != 2:
            item["loss_mask"] = mask
        items.append(item)
    return items


def _reference(items: list[dict], t: int, ignore: int) -> list[list[tuple[int, dict[int, float], float]]]:
    """Per row and position ``(label, {id: prob}, tail mass)``, walking each item's positions one by one
    and consuming its targets in order at the positions that hold them."""
    rows = []
    for item in items:
        tg = item["targets"]
        mask = item.get("loss_mask", torch.ones(len(item["input_ids"]), dtype=torch.bool)).tolist()
        offsets, ids, probs = tg.estimate()
        tails = tg.tail_mass.tolist() if tg.method in ("topk", "hybrid") else [0.0] * tg.num_positions
        row, j = [], 0
        for pos in range(t):
            stored = pos < len(mask) and (tg.num_positions == len(mask) or mask[pos])
            label = int(item["labels"][pos]) if pos < len(mask) and mask[pos] else ignore
            if not stored:
                row.append((label, {}, 0.0))
                continue
            lo, hi = int(offsets[j]), int(offsets[j + 1])
            row.append((label, dict(zip(ids[lo:hi].tolist(), probs[lo:hi].tolist())), tails[j]))
            j += 1
        assert j == tg.num_positions
        rows.append(row)
    return rows


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid", "full"])
def test_masked_items_place_their_targets_at_the_trained_positions(method: str) -> None:
    items = _masked_items(method)
    batch = collate(items, pad_id=5, ignore_index=-7)
    t = max(MASKED_LENGTHS)
    assert batch["input_ids"].shape == (len(items), t) and batch["target_tail_mass"].shape == (len(items), t)
    for row, (item, want) in enumerate(zip(items, _reference(items, t, -7))):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"]) and (batch["input_ids"][row, n:] == 5).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (t - n)
        for pos, (label, entries, tail) in enumerate(want):
            m = batch["target_mask"][row, pos]
            assert int(batch["labels"][row, pos]) == label, (row, pos)
            assert dict(zip(batch["target_ids"][row, pos][m].tolist(), batch["target_probs"][row, pos][m].tolist())) \
                == entries, (row, pos)
            assert int(m.sum()) == len(entries)
            assert (batch["target_probs"][row, pos][~m] == 0).all() and (batch["target_ids"][row, pos][~m] == 0).all()
            assert float(batch["target_tail_mass"][row, pos]) == pytest.approx(tail, abs=0), (row, pos)


def test_masked_item_alone_equals_the_same_item_in_a_mixed_batch() -> None:
    items = _masked_items("hybrid", seed=1)
    batch = collate(items)
    for row, item in enumerate(items):
        alone, n = collate([item]), len(item["input_ids"])
        u = alone["target_ids"].shape[-1]
        for key in ("labels", "target_tail_mass"):
            assert torch.equal(batch[key][row, :n], alone[key][0]), key
        for key in ("target_ids", "target_probs", "target_mask"):
            assert torch.equal(batch[key][row, :n, :u], alone[key][0]), key
            assert not batch[key][row, :n, u:].any(), key


def test_masked_items_with_wrong_target_counts_are_refused() -> None:
    items = _masked_items("topk")
    wrong = {**items[4], "targets": items[1]["targets"]}  # 7 target positions; item 4 has 5 positions
    trained = int(items[4]["loss_mask"].sum())
    with pytest.raises(TargetsError, match=rf"item 1 \(seq_id 304\): targets cover 7 positions; expected 5 "
                                           rf"\(every position\) or {trained} \(the positions its loss_mask trains\)"):
        collate([items[0], wrong])
    with pytest.raises(TargetsError, match=r"item 0 \(seq_id 301\): loss_mask has shape \(6,\)"):
        collate([{**items[1], "loss_mask": torch.ones(6, dtype=torch.bool)}])


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid", "full"])
def test_collate_writes_every_element_of_its_buffers_and_uses_two(monkeypatch, method: str) -> None:
    """``one_buffer`` hands out uninitialised memory: here every byte starts as 0x5A, and the batch must still equal
    the one collated from fresh memory, in four buffers (a worker's batch crosses as four shared-memory segments, not
    eight), which torch.save takes."""
    items = make_items(_teacher(1), LENGTHS, method, k=4, n=20)
    want = collate(items)
    real = collate_module.one_buffer

    def dirty(parts):
        tensors = real(parts)
        for tensor in tensors:
            tensor.view(torch.uint8).fill_(0x5A)
        return tensors

    monkeypatch.setattr(collate_module, "one_buffer", dirty)
    got = collate(items)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
    storages = {v.untyped_storage().data_ptr() for v in got.values() if isinstance(v, torch.Tensor)}
    assert len(storages) == 4
    buffer = io.BytesIO()
    torch.save(got, buffer)
    buffer.seek(0)
    assert all(torch.equal(v, got[k]) for k, v in torch.load(buffer).items() if isinstance(v, torch.Tensor))
