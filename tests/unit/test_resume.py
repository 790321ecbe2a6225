"""Checkpoint and resume the way trainers do it: ``ds.state_dict()`` with no argument, torchdata's
``StatefulDataLoader`` (workers 0/1/2), never a silent restart. The reference is always an
uninterrupted plain ``DataLoader`` pass over a fresh dataset, compared batch for batch.
(The HF ``Trainer`` recipe is tests/integration/test_resume_trainer.py.)"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import tiny_store
from torch.utils.data import DataLoader

from logitcache.errors import ConfigError
from logitcache.train.dataset import CacheDataset

SEQUENCES, BATCH = 22, 4  # 6 batches per epoch, the last one of 2
BATCHES = -(-SEQUENCES // BATCH)
KEYS = ("seq_ids", "input_ids", "labels", "target_ids", "target_probs", "target_mask")


@pytest.fixture(scope="module")
def store(tiny_teacher, tmp_path_factory) -> str:
    return tiny_store(tiny_teacher, tmp_path_factory.mktemp("resume_store") / "store", SEQUENCES, 5)


def dataset(store: str, **over) -> CacheDataset:
    return CacheDataset(store, **{"shuffle": True, "seed": 3, "epoch": 1, "batch_size": BATCH, **over})


def plain(batch: dict) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in KEYS}


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [b["seq_ids"].tolist() for b in got] == [b["seq_ids"].tolist() for b in want]
    for g, w in zip(got, want):
        for k in KEYS:
            assert torch.equal(g[k], w[k]), k


@pytest.fixture(scope="module")
def uninterrupted(store) -> list[dict]:
    ds = dataset(store)
    batches = [plain(b) for b in DataLoader(ds, batch_size=BATCH, collate_fn=ds.collate)]
    assert len(batches) == BATCHES and len({s for b in batches for s in b["seq_ids"].tolist()}) == SEQUENCES
    return batches


def rest_after(state: dict, store: str, num_workers: int = 0) -> list[dict]:
    ds = dataset(store)
    ds.load_state_dict(state)
    return [plain(b) for b in DataLoader(ds, batch_size=BATCH, num_workers=num_workers, collate_fn=ds.collate)]


# -- the naive sequence: 3 batches, ds.state_dict(), restore, continue ------------------------------

def test_naive_sequence_in_the_main_process_resumes_exactly(store, uninterrupted):
    ds = dataset(store)
    loader = DataLoader(ds, batch_size=BATCH, collate_fn=ds.collate)
    taken = []
    for batch in loader:
        taken.append(plain(batch))
        if len(taken) == 3:
            state = ds.state_dict()
            break
    assert state["consumed"] == 3 * BATCH and state["epoch"] == 1
    assert_same_batches(taken, uninterrupted[:3])
    assert_same_batches(rest_after(state, store, num_workers=2), uninterrupted[3:])


@pytest.mark.parametrize("num_workers", [1, 2])
def test_naive_sequence_with_workers_refuses_and_says_what_to_pass(store, uninterrupted, num_workers):
    ds = dataset(store)
    taken = []
    for batch in DataLoader(ds, batch_size=BATCH, num_workers=num_workers, collate_fn=ds.collate):
        taken.append(plain(batch))
        if len(taken) == 3:
            with pytest.raises(ConfigError, match=r"batches_consumed=k.*StatefulDataLoader"):
                ds.state_dict()
            state = ds.state_dict(batches_consumed=3)  # the count the loop knows
            break
    assert_same_batches(rest_after(state, store), uninterrupted[3:])


def test_position_without_an_argument_follows_what_this_process_read(store, uninterrupted):
    ds = dataset(store)
    assert ds.state_dict()["consumed"] == 0  # nothing read yet: the epoch start is the truth
    items = iter(ds)
    for _ in range(5):
        next(items)
    assert ds.state_dict()["consumed"] == 5  # not a batch boundary: still the exact next item
    rest = [i["seq_id"] for i in items]
    assert ds.state_dict()["consumed"] == SEQUENCES
    assert rest == [s for b in uninterrupted for s in b["seq_ids"].tolist()][5:]

    ds.load_state_dict(dataset(store).state_dict(batches_consumed=2))
    assert ds.state_dict()["consumed"] == 8  # loaded, not read since
    ds.set_epoch(1)  # the same epoch: the trainer's epoch-start call keeps the position
    assert ds.state_dict()["consumed"] == 8
    assert_same_batches([plain(b) for b in DataLoader(ds, batch_size=BATCH, collate_fn=ds.collate)],
                        uninterrupted[2:])
    ds.set_epoch(2)  # another epoch: from its start
    assert (ds.state_dict()["epoch"], ds.state_dict()["consumed"]) == (2, 0)


def test_a_copied_or_pickled_dataset_keeps_its_position(store):
    ds = dataset(store)
    items = iter(ds)
    for _ in range(6):
        next(items)
    for twin in (copy.deepcopy(ds), pickle.loads(pickle.dumps(ds))):
        assert twin.state_dict() == ds.state_dict() and twin.state_dict()["consumed"] == 6


def test_workers_flag_clears_with_the_next_epoch(store):
    ds = dataset(store)
    assert len(list(DataLoader(ds, batch_size=BATCH, num_workers=1, collate_fn=ds.collate))) == BATCHES
    with pytest.raises(ConfigError, match="worker processes have read"):
        ds.state_dict()
    ds.set_epoch(2)
    assert ds.state_dict()["consumed"] == 0 and ds.state_dict()["epoch"] == 2


def test_worker_flag_crosses_a_spawned_worker(store):
    ds = dataset(store)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=1, collate_fn=ds.collate,
                        multiprocessing_context="spawn")
    next(iter(loader))
    with pytest.raises(ConfigError, match="batches_consumed=k"):
        ds.state_dict()


def test_worker_state_loads_only_in_its_worker(store):
    ds = dataset(store)
    worker_state = {**ds.state_dict(), "worker": {"id": 1, "num_workers": 2, "offset": 4}}
    with pytest.raises(ConfigError, match=r"'worker': found .*expected None.*StatefulDataLoader"):
        dataset(store).load_state_dict(worker_state)


# -- torchdata StatefulDataLoader --------------------------------------------------------------------

CHECKPOINTS = (0, 1, 3, BATCHES - 1, BATCHES)  # batches taken before loader.state_dict(); the last: all


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_stateful_dataloader_resumes_batch_for_batch(store, uninterrupted, num_workers):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def loader(ds):
        return stateful.StatefulDataLoader(ds, batch_size=BATCH, num_workers=num_workers, collate_fn=ds.collate)

    ds = dataset(store)
    first, states = loader(ds), {}
    if 0 in CHECKPOINTS:
        states[0] = first.state_dict()
    seen = []
    for batch in first:
        seen.append(plain(batch))
        if len(seen) in CHECKPOINTS:
            states[len(seen)] = first.state_dict()
    assert_same_batches(seen, uninterrupted)
    assert sorted(states) == sorted(CHECKPOINTS)
    for k, state in states.items():
        resumed = loader(dataset(store))
        resumed.load_state_dict(state)
        assert_same_batches([plain(b) for b in resumed], uninterrupted[k:])
