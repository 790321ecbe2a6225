"""Token-budget packing at load time (``CacheDataset(pack_tokens=N)``): rows of whole sequences within the
budget, as many rows on every rank and balanced by tokens, the same rows in order for any number of
loader workers, and exact resume (state_dict, StatefulDataLoader, the HF Trainer).

The reference is always the store read directly (``iter_sequences``, no dataset): every segment of every
packed row must be that sequence's tokens, labels, positions and targets, laid out by ``collate`` of an
item built here from the decoded row. The store is a ``documents`` store written with the store API:
140 sequences of random lengths (a long tail up to ``seq_len + 1``), random masks, compact targets.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import train_counting_decodes, write_documents_store
from logitcache.errors import ConfigError, CorruptShardError, StoreMismatchError
from logitcache.models.tokenizers import tokenizer_fingerprint
from logitcache.store.reader import iter_sequences
from logitcache.testing.store_conformance import VOCAB
from logitcache.testing.targets import build
from logitcache.train.collate import collate
from logitcache.train.dataset import CacheDataset
from logitcache.train.world import World

IGNORE = -100
SEQ_LEN, PER_SHARD, SEQUENCES = 48, 7, 140
BUDGET, WINDOW = 64, 20  # input positions per row; sequences packed together
TRAINER_BUDGET = 160  # fewer, longer rows for the Trainer runs
K, N = 4, 20
ROW_KEYS = ("input_ids", "labels", "position_ids", "target_ids", "target_probs", "target_mask", "target_tail_mass")


def _rows(seed: int) -> list[tuple[int, np.ndarray, np.ndarray, object]]:
    """``(seq_id, tokens int32[L], mask bool[L-1], compact targets)``; lengths log-normal (median ~14, a tail
    to ``seq_len + 1``), at least one trained position per row."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(14), 0.7, SEQUENCES)).astype(int), 2, SEQ_LEN + 1)
    lengths[[5, 77]] = SEQ_LEN + 1
    rows = []
    for i, length in enumerate(lengths):
        mask = rng.random(length - 1) < 0.5
        mask[rng.integers(0, length - 1)] = True
        t = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.3)).sample((int(mask.sum()),))
        t = (t + 1e-9) / (t + 1e-9).sum(-1, keepdim=True)
        tokens = rng.integers(0, VOCAB, length).astype(np.int32)
        rows.append((5000 + 3 * i, tokens, mask, build("hybrid", t, gen, k=K, n=N)))
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_tokenizer) -> str:
    root = str(tmp_path_factory.mktemp("packed_loading") / "store")
    return write_documents_store(root, "hybrid", _rows(seed=3), tokenizer_fingerprint(tiny_tokenizer),
                                 per_shard=PER_SHARD, k=K, n=N, seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def reference(store) -> dict[int, dict]:
    """seq_id → the item built from the decoded row (the store read directly), collated alone: ``[1, T]``."""
    out = {}
    for seq_id, tokens, mask, targets in iter_sequences(store, with_mask=True):
        tokens, loss_mask = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask)
        item = {"seq_id": seq_id, "input_ids": tokens[:-1], "loss_mask": loss_mask, "targets": targets,
                "labels": torch.where(loss_mask, tokens[1:], IGNORE)}
        out[seq_id] = {**collate([item]), "position_ids": torch.arange(len(mask))[None], "trained": int(mask.sum())}
    return out


def dataset(store: str, **over) -> CacheDataset:
    return CacheDataset(store, **{"shuffle": True, "seed": 4, "epoch": 1, "pack_tokens": BUDGET,
                                  "pack_window": WINDOW, **over})


def read(ds: CacheDataset, num_workers: int = 0) -> list[dict]:
    return list(DataLoader(ds, batch_size=None, num_workers=num_workers))


def assert_row_is_the_store(row: dict, reference: dict[int, dict]) -> None:
    """Each segment of ``row`` (by ``cu_seq_lens``) equals its sequence read from the store; nothing else."""
    cu = row["cu_seq_lens_q"].tolist()
    assert cu[0] == 0 and cu[-1] == row["input_ids"].shape[1] <= BUDGET
    assert torch.equal(row["cu_seq_lens_k"], row["cu_seq_lens_q"]) and "attention_mask" not in row
    assert row["max_length_q"] == max(b - a for a, b in zip(cu, cu[1:]))
    for seq_id, a, b in zip(row["seq_ids"].tolist(), cu, cu[1:]):
        want = reference[seq_id]
        assert b - a == want["input_ids"].shape[1], seq_id
        for key in ROW_KEYS:
            got = row[key][:, a:b]
            if key.startswith("target_") and got.dim() == 3:  # the row's id axis is as wide as its widest position
                width = want[key].shape[-1]
                assert not got[..., width:].any(), (seq_id, key)
                got = got[..., :width]
            assert torch.equal(got, want[key]), (seq_id, key)


def rows_by_rank(store: str, world_size: int, num_workers: int, **over) -> list[list[dict]]:
    return [read(dataset(store, world=World(rank, world_size), **over), num_workers) for rank in range(world_size)]


def seq_rows(rows: list[dict]) -> list[tuple[int, ...]]:
    return [tuple(r["seq_ids"].tolist()) for r in rows]


# -- an epoch: every sequence once, rows within the budget, equal and balanced ranks ------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_an_epoch_holds_every_trained_position_once_across_ranks_and_workers(store, reference, world_size):
    ranks = rows_by_rank(store, world_size, 0)
    for num_workers in (1, 2):  # the loader yields the same rows in the same order for any num_workers
        assert [seq_rows(r) for r in rows_by_rank(store, world_size, num_workers)] == [seq_rows(r) for r in ranks]
    lengths = {len(rows) for rows in ranks}
    assert lengths == {len(dataset(store, world=World(0, world_size)))}  # equal rows on every rank, as len says
    for rows in ranks:
        for row in rows:
            assert_row_is_the_store(row, reference)
    everything = [r for rows in ranks for r in seq_rows(rows)]
    distinct = set(everything)
    assert len(everything) - len(distinct) < world_size  # padding repeats at most world_size - 1 rows
    seen = Counter(s for row in distinct for s in row)
    assert seen == Counter(list(reference))  # every sequence exactly once, padding aside: with the segments equal to
    # the store's rows, every trained position exactly once
    tokens = [sum(r["input_ids"].shape[1] for r in rows) for rows in ranks]
    assert max(tokens) - min(tokens) <= BUDGET  # the deal's bound (packed_order, step 3)


def test_drop_uneven_reads_the_full_rounds_of_the_padded_deal(store, reference):
    padded, dropped = rows_by_rank(store, 3, 0), rows_by_rank(store, 3, 0, drop_uneven=True)
    rounds = {len(rows) for rows in dropped}
    assert len(rounds) == 1 and all(seq_rows(d) == seq_rows(p)[:len(d)] for d, p in zip(dropped, padded))
    kept = Counter(s for rows in dropped for row in seq_rows(rows) for s in row)
    last_round = {s for d, p in zip(dropped, padded) for row in seq_rows(p)[len(d):] for s in row}
    assert max(kept.values()) == 1 and set(reference) - set(kept) == last_round - set(kept)


def test_rows_are_full_and_the_same_in_every_epoch_in_a_new_order(store):
    ds = dataset(store)
    first = seq_rows(read(ds))
    ds.set_epoch(2)
    second = seq_rows(read(ds))
    assert sorted(first) == sorted(second) and first != second and len(first) == len(ds)
    widths = [r["input_ids"].shape[1] for r in read(dataset(store, shuffle=False))]
    assert max(widths) <= BUDGET and 1 - sum(widths) / (len(widths) * BUDGET) < 0.15


def test_a_row_never_splits_a_sequence_longer_than_the_budget(store, reference):
    sizes = [want["input_ids"].shape[1] for want in reference.values()]  # in store order
    first, over = next(i for i, n in enumerate(sizes) if n > 40), sum(n > 40 for n in sizes)
    with pytest.raises(ConfigError, match=rf"sequence {first} of .* \(shard {first // PER_SHARD}, row "
                                          rf"{first % PER_SHARD}\) has {sizes[first]} input positions, more than "
                                          rf"pack_tokens=40 \({over} sequences are\); .*pack_tokens >= {SEQ_LEN}"):
        dataset(store, pack_tokens=40)
    assert len(dataset(store, pack_tokens=SEQ_LEN)) > 0  # the longest sequence fits a budget of seq_len
    with pytest.raises(ConfigError, match=r"batch_size: found 4, expected None or 1 with pack_tokens"):
        dataset(store, batch_size=4)
    with pytest.raises(ConfigError, match=r"pack_window must be an int >= 1 \(sequences packed together\); found 0"):
        dataset(store, pack_window=0)


def _without_lengths(store: str, tmp_path, change) -> str:
    """A copy of ``store`` whose manifest's shard entries are edited by ``change`` (the header digest does not
    cover them)."""
    import shutil

    copy = shutil.copytree(store, tmp_path / "edited")
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["shards"]:
        change(entry)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return str(copy)


def test_rows_are_planned_from_the_manifest_lengths_alone(store, tmp_path, monkeypatch):
    import logitcache.train.store_reads as store_reads

    def no_reads(*args, **kwargs):
        raise AssertionError("a shard was read to plan the rows")

    monkeypatch.setattr(store_reads, "read_unit", no_reads)
    ds = dataset(store)  # the plan, len, the rows of every rank: no shard read
    assert len(ds) == len(ds.rows()) and sum(r.size for r in ds.rows()) == SEQUENCES
    monkeypatch.undo()
    old = _without_lengths(store, tmp_path, lambda entry: entry.pop("lengths"))
    with pytest.raises(ConfigError, match=r"units \[0, 1, 2, .*record none .*Recapture or `logitcache convert`"):
        dataset(old)
    assert len(CacheDataset(old)) == SEQUENCES  # padded batches need no lengths


def test_a_row_that_disagrees_with_its_recorded_length_is_refused(store, tmp_path):
    def lengthen(entry):
        if entry["index"] == 2:
            entry["lengths"][3] += 1 if entry["lengths"][3] <= SEQ_LEN else -1

    edited = _without_lengths(store, tmp_path, lengthen)
    with pytest.raises(CorruptShardError, match=r"shard 2 row 3 \(seq_id \d+\) holds \d+ tokens; the manifest records"):
        read(dataset(edited, shuffle=False))


# -- resume ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(store) -> list[dict]:
    return read(dataset(store))


def same_rows(got: list[dict], want: list[dict]) -> None:
    assert seq_rows(got) == seq_rows(want)
    for g, w in zip(got, want):
        for key in (*ROW_KEYS, "cu_seq_lens_q", "seq_ids"):
            assert torch.equal(g[key], w[key]), key


def checkpoints(count: int) -> tuple[int, ...]:
    return (0, 1, count // 2, count - 1, count)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_after_k_rows_resumes_row_for_row(store, uninterrupted, num_workers):
    for k in checkpoints(len(uninterrupted)):
        first = dataset(store)
        loader = iter(DataLoader(first, batch_size=None, num_workers=num_workers))
        taken = [next(loader) for _ in range(k)]
        state = first.state_dict(batches_consumed=k)
        if num_workers == 0:
            assert first.state_dict() == state  # what the main process counted itself
        assert (state["consumed"], state["pack_tokens"], state["pack_window"]) == (k, BUDGET, WINDOW)
        resumed = dataset(store)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        same_rows(taken + read(resumed, num_workers=2 - num_workers), uninterrupted)


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_stateful_dataloader_resumes_row_for_row(store, uninterrupted, num_workers):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def loader(ds):
        return stateful.StatefulDataLoader(ds, batch_size=None, num_workers=num_workers)

    first, states, seen = loader(dataset(store)), {}, []
    at = checkpoints(len(uninterrupted))
    states[0] = first.state_dict()
    for row in first:
        seen.append(row)
        if len(seen) in at:
            states[len(seen)] = first.state_dict()
    same_rows(seen, uninterrupted)
    assert sorted(states) == sorted(set(at))
    for k, state in states.items():
        resumed = loader(dataset(store))
        resumed.load_state_dict(state)
        same_rows(list(resumed), uninterrupted[k:])


def test_a_state_resumes_only_with_the_same_packing(store):
    state = dataset(store).state_dict(batches_consumed=2)
    for over, field in [({"pack_tokens": None}, "pack_tokens"), ({"pack_tokens": BUDGET + 1}, "pack_tokens"),
                        ({"pack_window": WINDOW + 1}, "pack_window")]:
        with pytest.raises(ConfigError, match=rf"state field '{field}': found {state[field]}, expected"):
            dataset(store, **over).load_state_dict(state)
    sequences = CacheDataset(store, shuffle=True, seed=4, epoch=1, batch_size=3).state_dict(batches_consumed=2)
    with pytest.raises(ConfigError, match=r"state field 'pack_tokens': found None, expected 64"):
        dataset(store).load_state_dict(sequences)
    saved_before = {k: v for k, v in sequences.items() if k not in ("pack_tokens", "pack_window")}
    CacheDataset(store, shuffle=True, seed=4, epoch=1, batch_size=3).load_state_dict(saved_before)  # still loads
    with pytest.raises(StoreMismatchError, match="num_sequences"):
        dataset(store).load_state_dict({**state, "num_sequences": SEQUENCES + 1})


# -- the HF Trainer --------------------------------------------------------------------------------------

def train(store: str, teacher: str, out, *, stop: int | None = None, resume: bool = False):
    """One ``KDTrainer.train()`` over packed rows; returns the seq_ids of each micro-batch it trained on, the
    student, and how many sequences the dataset decoded."""
    from transformers import TrainerCallback, TrainingArguments

    from logitcache.train.hf_trainer import KDTrainer, training_args_defaults
    from logitcache.train.loop import make_student

    seen: list[list[int]] = []

    class Recording(KDTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            seen.append(inputs["seq_ids"].tolist())
            return super().training_step(model, inputs, *args, **kwargs)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop:
                control.should_training_stop = True

    ds = dataset(store, epoch=0, pack_tokens=TRAINER_BUDGET)
    steps = len(ds) + 3  # into the second epoch
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=1, learning_rate=1e-3,
                             use_cpu=True, disable_tqdm=True, logging_strategy="no", save_strategy="steps",
                             save_steps=stop or steps, seed=0, **training_args_defaults())
    trainer = Recording(model=make_student(f"init:{teacher}:1"), args=args, train_dataset=ds,
                        data_collator=ds.collate_rows, kd_alpha=0.5, callbacks=[Stop()])
    decoded = train_counting_decodes(trainer, resume=resume)
    return seen, trainer.model, decoded


def test_a_resumed_trainer_trains_on_exactly_the_rows_after_its_checkpoint(store, tiny_teacher, tmp_path):
    rows = len(dataset(store, pack_tokens=TRAINER_BUDGET))
    whole, student, _ = train(store, tiny_teacher, tmp_path / "whole")
    order = [dataset(store, epoch=e, pack_tokens=TRAINER_BUDGET).rows() for e in (0, 1)]
    seq_ids = [seq_id for seq_id, *_ in iter_sequences(store)]  # by global index
    assert whole == [[seq_ids[i] for i in row] for row in order[0] + order[1][:3]]
    weights = {k: v.detach().clone() for k, v in student.state_dict().items()}
    for k in (2, rows, rows + 1):  # mid-epoch 0, the epoch boundary, mid-epoch 1
        out = tmp_path / f"cut{k}"
        first, _, _ = train(store, tiny_teacher, out, stop=k)
        assert first == whole[:k]
        saved = json.loads((out / f"checkpoint-{k}" / "dataset_state.json").read_text())["dataset"]
        assert (saved["epoch"], saved["consumed"], saved["pack_tokens"]) == ((k - 1) // rows, (k - 1) % rows + 1,
                                                                            TRAINER_BUDGET)
        rest, resumed, decoded = train(store, tiny_teacher, out, resume=True)
        assert rest == whole[k:]
        assert decoded <= sum(map(len, whole[k:])) + max(map(len, whole))  # plus Accelerate's one look-ahead row
        for name, value in resumed.state_dict().items():
            torch.testing.assert_close(value, weights[name], rtol=0, atol=1e-6, msg=name)


def test_the_trainer_needs_one_row_per_micro_batch(store, tiny_teacher, tmp_path):
    from transformers import TrainingArguments

    from logitcache.train.hf_trainer import KDTrainer, training_args_defaults
    from logitcache.train.loop import make_student

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                             **training_args_defaults())
    ds = dataset(store)
    with pytest.raises(ConfigError, match=r"per-device train batch size: found 2, expected 1 .*collate_rows"):
        KDTrainer(model=make_student(f"init:{tiny_teacher}:1"), args=args, train_dataset=ds,
                  data_collator=ds.collate_rows)
    with pytest.raises(ConfigError, match=r"collate_rows takes loader batches of one packed row; found 2"):
        ds.collate_rows(read(ds)[:2])
