"""benchmarks/loader_speed.py's cases run against the loader as it is laid out today: each case reads every
position, ``loader-rows`` really decodes row by row (and puts the unit decoder back), and the stage timer times
every stage. (Its patch point moved once with the package's layout and the script broke unnoticed.)"""

from __future__ import annotations

import importlib

import pytest
import torch

from logitcache.store import unit_decode
from logitcache.train import store_reads
from helpers import benchmarks_importable

SEQ_LEN, SEQUENCES = 16, 24


@pytest.fixture(scope="module")
def bench():
    with benchmarks_importable():
        yield importlib.import_module("loader_speed")


@pytest.fixture(scope="module")
def store(bench, tiny_teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("loader_speed") / "store"
    bench.make_store(path, SEQ_LEN, SEQUENCES, 8, 8, tiny_teacher)
    return path


def test_every_case_reads_every_position(bench, store):
    positions = SEQ_LEN * SEQUENCES
    assert bench.raw_read(store) == positions
    assert bench.loader_read(store, 4) == positions
    assert bench.loader_read(store, 4, verify=False) == positions
    assert bench.loader_read(store, 4, collate=False) == positions
    assert bench.WorkersPass(4, 1)(store) == positions
    before = torch.multiprocessing.get_sharing_strategy()
    by_name = bench.WorkersPass(4, 1, "file_system")
    assert by_name(store) == positions and by_name(store) == positions and len(by_name.cpu) == 2
    assert torch.multiprocessing.get_sharing_strategy() == before  # put back once the workers are forked


def test_rows_case_decodes_row_by_row_and_restores_the_unit_decoder(bench, store, monkeypatch):
    calls = {"rows": 0, "units": 0}
    row, decode = unit_decode.RowsByRow.row, unit_decode.decode_unit

    def counted_row(self, r):
        calls["rows"] += 1
        return row(self, r)

    def counted_decode(*args, **kwargs):
        calls["units"] += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(unit_decode.RowsByRow, "row", counted_row)
    monkeypatch.setattr(unit_decode, "decode_unit", counted_decode)
    before = store_reads.unit_rows
    assert bench.loader_read(store, 4, rows=True) == SEQ_LEN * SEQUENCES
    assert calls == {"rows": SEQUENCES, "units": 0}
    assert store_reads.unit_rows is before
    bench.loader_read(store, 4)
    assert calls["units"] > 0 and calls["rows"] == SEQUENCES


def test_stage_times_times_every_stage(bench, store):
    stages = bench.stage_times(store, 4, 1)
    assert set(stages) == {"read", "decode", "items", "collate", "pass"}
    assert all(seconds > 0 for seconds in stages.values())
