"""Epoch order and partition: pure numpy, parametrised over world shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from logitcache.errors import ConfigError
from logitcache.train.partition import epoch_order, partition, rank_count
from logitcache.train.world import World, detect_world

SIZES = [5] * 7 + [2]  # 37 sequences in 8 uneven shards, like the test store
N = sum(SIZES)


def readers(world_size: int, num_workers: int):
    for rank in range(world_size):
        for worker in range(max(1, num_workers)):
            yield World(rank=rank, world_size=world_size, worker_id=worker, num_workers=num_workers)


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("num_workers", range(0, 5))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_drop_uneven_reads_each_sequence_exactly_once(world_size, num_workers, batch_size):
    order = epoch_order(N, seed=7, epoch=1, shuffle=True, shard_sizes=SIZES)
    parts = {w: partition(order, w, drop_uneven=True, batch_size=batch_size) for w in readers(world_size, num_workers)}
    got = np.concatenate(list(parts.values()))
    kept = order[:(N // world_size) * world_size]
    assert sorted(got.tolist()) == sorted(kept.tolist())
    assert len(set(got.tolist())) == got.size  # no repeats
    for rank in range(world_size):
        per_rank = sum(p.size for w, p in parts.items() if w.rank == rank)
        assert per_rank == N // world_size == rank_count(N, world_size, drop_uneven=True)


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("num_workers", range(0, 5))
def test_padding_reads_every_sequence_with_equal_counts_per_rank(world_size, num_workers):
    order = epoch_order(N, seed=7, epoch=0, shuffle=True, shard_sizes=SIZES)
    parts = {w: partition(order, w, batch_size=2) for w in readers(world_size, num_workers)}
    got = np.concatenate(list(parts.values()))
    assert set(got.tolist()) == set(range(N))
    repeats = got.size - N
    assert 0 <= repeats <= world_size - 1 <= world_size * max(1, num_workers) - 1
    counts = [sum(p.size for w, p in parts.items() if w.rank == r) for r in range(world_size)]
    assert counts == [math.ceil(N / world_size)] * world_size
    # padding repeats from the start of the order
    padded = np.concatenate([order, order[:repeats]])
    assert sorted(got.tolist()) == sorted(padded.tolist())


def test_tiny_order_smaller_than_world():
    order = epoch_order(3, seed=0, epoch=0, shuffle=False)
    parts = [partition(order, w) for w in readers(8, 0)]
    assert [p.tolist() for p in parts] == [[0], [1], [2], [0], [1], [2], [0], [1]]
    assert all(partition(order, w, drop_uneven=True).size == 0 for w in readers(8, 0))
    assert partition(np.zeros(0, np.int64), World()).size == 0


def test_workers_interleave_whole_batches_in_loader_round_robin():
    order = np.arange(23, dtype=np.int64)
    streams = [partition(order, World(num_workers=3, worker_id=w), batch_size=4) for w in range(3)]
    # the DataLoader takes batch j from worker j % 3: reassembled, that is the rank's order
    batches = [[s[i:i + 4] for i in range(0, s.size, 4)] for s in streams]
    merged = [batches[w][j] for j in range(max(map(len, batches))) for w in range(3) if j < len(batches[w])]
    assert np.concatenate(merged).tolist() == list(range(23))
    # skipping k sequences leaves exactly the rest, whatever the worker count
    rest = [partition(order, World(num_workers=2, worker_id=w), batch_size=4, skip=8) for w in range(2)]
    assert sorted(np.concatenate(rest).tolist()) == list(range(8, 23))


def test_same_seed_same_order_epochs_and_seeds_differ():
    a = epoch_order(N, 3, 0, True, shard_sizes=SIZES)
    assert np.array_equal(a, epoch_order(N, 3, 0, True, shard_sizes=SIZES))
    assert not np.array_equal(a, epoch_order(N, 3, 1, True, shard_sizes=SIZES))
    assert not np.array_equal(a, epoch_order(N, 4, 0, True, shard_sizes=SIZES))
    assert sorted(a.tolist()) == list(range(N))
    assert epoch_order(N, 3, 0, False).tolist() == list(range(N))
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    epoch_order(N, 3, 0, True, shard_sizes=SIZES)
    assert np.random.random() == before  # the global RNG is untouched


@pytest.mark.parametrize("seed", range(5))
def test_shard_locality_bound(seed):
    sizes = [16] * 30 + [7]
    n, window = sum(sizes), 32
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    order = epoch_order(n, seed, 2, True, shard_sizes=sizes, window=window)
    for lo in range(0, n, window):
        shards = set(shard_of[order[lo:lo + window]].tolist())
        assert len(shards) <= math.ceil(window / 7) + 1
        assert len(shards) <= window // 16 + 2  # full shards: a block of 2 shard lengths spans <= 3
    # each shard's sequences lie within consecutive blocks: a reader never returns to a finished shard
    block = np.empty(n, dtype=np.int64)
    block[order] = np.arange(n) // window
    for s in range(len(sizes)):
        blocks = np.unique(block[shard_of == s])
        assert blocks.max() - blocks.min() == blocks.size - 1
    # shards really move: their order of first appearance is shuffled
    _, first = np.unique(shard_of[order], return_index=True)
    assert np.argsort(first).tolist() != list(range(len(sizes)))


def test_world_validation_and_detection(monkeypatch):
    with pytest.raises(ConfigError, match="rank"):
        World(rank=2, world_size=2)
    with pytest.raises(ConfigError, match="worker_id"):
        World(worker_id=1, num_workers=0)
    with pytest.raises(ConfigError, match="world_size"):
        World(world_size=0)
    w = World(rank=1, world_size=3, worker_id=2, num_workers=4)
    assert (w.num_readers, w.reader_id, w.workers) == (12, 6, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert detect_world() == World(rank=1, world_size=4)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK"):
        detect_world()


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="shard_sizes"):
        epoch_order(10, 0, 0, True, shard_sizes=[3, 3])
    with pytest.raises(ConfigError, match="seed"):
        epoch_order(10, -1, 0, True)
    with pytest.raises(ConfigError, match="skip"):
        partition(np.arange(4), World(), skip=5)
