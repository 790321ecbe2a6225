"""The training loop's DataLoader workers send batches by the ``file_system`` sharing strategy (half the training
process's CPU per batch of the default, docs/benchmarks.md), set in the workers only: the batches are those read in
the training process, and the training process's own strategy is left as it was."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.multiprocessing import get_sharing_strategy

from helpers import tiny_store
from logitcache.train import loop
from logitcache.train.collate import collate
from logitcache.train.dataset import CacheDataset


def _with_sharing(items: list[dict]) -> dict:
    """The batch, and the sharing strategy of the process that collated it."""
    return {**collate(items), "sharing": get_sharing_strategy()}


def _first_batch(path: str, workers: int) -> dict:
    config = SimpleNamespace(batch_size=2, num_workers=workers, store=path)
    batches = loop._batches(CacheDataset(path, batch_size=2), _with_sharing, config, loop._Run(None))
    try:
        return next(batches)
    finally:
        batches.close()


def test_the_loops_workers_send_batches_by_name(tiny_teacher, tmp_path):
    path = tiny_store(tiny_teacher, tmp_path / "store", sequences=8, sequences_per_shard=4)
    before = get_sharing_strategy()
    here, there = _first_batch(path, 0), _first_batch(path, 1)
    assert here["sharing"] == before != "file_system"  # torch's default on Linux
    assert there["sharing"] == "file_system"
    assert get_sharing_strategy() == before
    for key, value in here.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, there[key]), key
