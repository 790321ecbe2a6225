"""Training loader throughput (positions/s on one core) against a raw read of the same shard files.

Captures a store with the tiny offline teacher (default: seq_len 128, 200 sequences, sample N=50)
in a temporary directory, then times, interleaved over ``--repeats`` rounds (median reported):

* ``raw``: ``pyarrow`` memory-map + ``read_all`` (zstd decompression) of every shard's columns —
  the floor for reading these bytes, without decoding the compact row encoding (a Zarr store: every array read
  whole by zarr itself, what plain zarr gives);
* ``loader``: iterate ``CacheDataset`` (shuffle, ``verify=True``: each shard's sha256 checked when
  it is read; each unit's rows decoded at once, :mod:`logitcache.store.unit_decode`) through
  ``DataLoader(num_workers=0, batch_size, collate_fn=ds.collate)``;
* ``loader-rows``: the same with every row decoded by itself (``decode_row``, the path units of a newer
  format take: ``RowsByRow``);
* ``loader-noverify``: ``loader`` with ``verify=False``;
* ``iterate-only``: ``CacheDataset`` items without collation;
* ``loader-wN`` (with ``--workers N,...``): ``loader`` read by ``N`` DataLoader worker processes (persistent, started
  before the timing), for how the loader scales past one process; with ``--file-system`` also ``loader-wN-fs``, the
  workers sending batches by the ``file_system`` sharing strategy instead of the default ``file_descriptor``. Rows
  ``cpu:loader-wN[-fs]``: the training process's CPU time per pass (the fastest of ``--repeats``), what receiving
  the batches costs it.

* ``baseline`` (with ``--baseline DIR``): ``loader`` with the ``logitcache`` package of another checkout
  ``DIR`` (e.g. ``git archive <commit> | tar -x -C DIR``), imported under another name, so before and after
  are timed in the same rounds. Also paired by CPU time: ``2 · --repeats + 1`` rounds of one ``loader`` and one
  ``baseline`` pass, which goes first alternating (rows ``cpu:loader-paired``, ``cpu:baseline-paired``, the medians;
  printed, the median over rounds of baseline ÷ loader time), which a shared machine's steal disturbs less than
  the wall clock.

``--profile`` prints the top cProfile entries (by own time) of one ``loader`` and one ``loader-rows`` pass
(and one ``baseline`` pass). ``--stages`` also times each stage of a pass by itself in process CPU time (the fastest
of ``--repeats``; rows ``cpu:<stage>``): ``read`` (every unit's bytes, checksums and container), ``decode`` (every
read unit decoded), ``items`` (every item of the epoch from the decoded units), ``collate`` (the loader's batches of
those items) and ``pass`` (a whole ``loader`` pass), so what dominates is a number rather than a profile's share.
``--store DIR`` reads a store captured before (e.g. by a previous run with ``--keep DIR``) instead of capturing.

Everything runs on one thread (``torch.set_num_threads(1)``, ``pyarrow.set_cpu_count(1)``).

    python benchmarks/loader_speed.py          # appends to benchmarks/results/loader_speed.csv
    python benchmarks/loader_speed.py --teacher embedded:smollm2-135m-instruct --profile 12   # a real teacher's store
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import pstats
import shutil
import sys
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from common import PROVENANCE, ResultsFile, csv_argument, interleave, machine_load, provenance, single_thread, timed

import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig
from logitcache.store import read_manifest
from logitcache.store.reader import read_unit
from logitcache.store.unit_decode import RowsByRow, unit_rows
from logitcache.train import store_reads
from logitcache.train.dataset import CacheDataset

COLUMNS = PROVENANCE + ("threads", "case", "positions", "seconds", "positions_per_s")


def make_store(path: Path, seq_len: int, sequences: int, samples: int, per_shard: int, teacher: str | None) -> None:
    from logitcache.testing.tiny import make_tiny_teacher

    teacher = teacher or make_tiny_teacher(path.parent / "tiny_teacher")
    capture(CaptureConfig().with_overrides({
        "teacher.model": teacher, "teacher.dtype": "float32", "corpus.seq_len": seq_len,
        "corpus.max_tokens": seq_len * sequences, "store.path": str(path),
        "store.sequences_per_shard": per_shard, "sparsify.method": "sample", "sparsify.samples": samples}),
        progress=False)


def raw_read(store: Path) -> int:
    manifest = read_manifest(store)
    if manifest.header.store.format == "zarr":  # zarr's own read of every array (its asyncio pipeline)
        import zarr

        group = zarr.open_group(str(store / "data.zarr"), mode="r")
        for name in group.array_keys():
            group[name][:]
        return sum(record.positions for record in manifest.shards)
    positions = 0
    for record in manifest.shards:
        with pa.memory_map(str(store / record.objects[0].path)) as source:
            table = pa.ipc.open_stream(source).read_all()  # decompresses every column
        for name in table.schema.names:
            table.column(name).combine_chunks()
        positions += record.positions
    return positions


def loader_read(store: Path, batch_size: int, *, verify: bool = True, collate: bool = True, rows: bool = False,
                dataset_class=CacheDataset) -> int:
    """Positions read by a shuffled pass; ``rows``: every row decoded by ``decode_row`` (``RowsByRow``)."""
    unit_rows = store_reads.unit_rows
    store_reads.unit_rows = (lambda spec, unit, index: RowsByRow(spec, unit)) if rows else unit_rows
    try:
        ds = dataset_class(store, shuffle=True, seed=0, verify=verify, batch_size=batch_size)
        if not collate:
            return sum(int(item["input_ids"].numel()) for item in ds)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=0, collate_fn=ds.collate)
        return sum(int(batch["attention_mask"].sum()) for batch in loader)
    finally:
        store_reads.unit_rows = unit_rows


class WorkersPass:
    """A shuffled ``loader`` pass through ``DataLoader(num_workers=workers, persistent_workers=True)``, the loader
    made on the first call, so the workers' start is not timed (each pass re-iterates the dataset in them).

    ``sharing``: the ``torch.multiprocessing`` sharing strategy the workers send batches with (set while they are
    forked, then put back: a worker keeps the one it was forked with). ``cpu`` collects this (the training)
    process's CPU seconds per pass: what receiving the batches costs it."""

    def __init__(self, batch_size: int, workers: int, sharing: str | None = None) -> None:
        self.batch_size, self.workers, self.sharing, self.loader = batch_size, workers, sharing, None
        self.cpu: list[float] = []

    def __call__(self, store: Path) -> int:
        start = time.process_time()
        if self.loader is None:
            ds = CacheDataset(store, shuffle=True, seed=0, verify=True, batch_size=self.batch_size)
            self.loader = DataLoader(ds, batch_size=self.batch_size, num_workers=self.workers, collate_fn=ds.collate,
                                     persistent_workers=True)
        before = torch.multiprocessing.get_sharing_strategy()
        torch.multiprocessing.set_sharing_strategy(self.sharing or before)
        try:
            batches = iter(self.loader)  # the first pass forks the workers
        finally:
            torch.multiprocessing.set_sharing_strategy(before)
        positions = sum(int(batch["attention_mask"].sum()) for batch in batches)
        self.cpu.append(time.process_time() - start)
        return positions


def baseline_dataset(checkout: Path, workdir: Path):
    """``CacheDataset`` of the ``logitcache`` package in ``checkout``, imported as ``logitcache_baseline`` (its
    imports of itself are relative)."""
    shutil.copytree(checkout / "logitcache", workdir / "baseline" / "logitcache_baseline")
    sys.path.insert(0, str(workdir / "baseline"))
    return importlib.import_module("logitcache_baseline.train.dataset").CacheDataset


def stage_times(store: Path, batch_size: int, repeats: int) -> dict[str, float]:
    """Process CPU seconds of each stage of a shuffled loader pass, the fastest of ``repeats`` (module docstring)."""
    ds = CacheDataset(store, shuffle=True, seed=0, verify=True, batch_size=batch_size, cache_shards=10**6)
    st = ds._store  # the read side the dataset's items come from
    order = [int(i) for i in ds.indices()]
    units = [read_unit(st.fs, st.spec, r, check=True) for r in st.records]
    items = [st.item(i) for i in order]  # every unit decoded into the reader's cache
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    stages = {
        "read": lambda: [read_unit(st.fs, st.spec, r, check=True) for r in st.records],
        "decode": lambda: [unit_rows(st.spec, u, r.index) for u, r in zip(units, st.records)],
        "items": lambda: [st.item(i) for i in order],
        "collate": lambda: [ds.collate(b) for b in batches],
        "pass": lambda: loader_read(store, batch_size),
    }
    best = {}
    for name, fn in stages.items():
        seconds = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            seconds.append(time.process_time() - start)
        best[name] = min(seconds)
    return best


def paired_cpu(new, old, store: Path, repeats: int) -> tuple[float, float, float]:
    """Process CPU seconds of ``new``'s and ``old``'s passes (medians) and the median over rounds of old ÷ new:
    one pass each per round, which goes first alternating, so drift and order hit both alike."""
    times: dict[str, list[float]] = {"new": [], "old": []}
    for round_ in range(repeats):
        for name in ("new", "old") if round_ % 2 else ("old", "new"):
            start = time.process_time()
            (new if name == "new" else old)(store)
            times[name].append(time.process_time() - start)
    ratio = statistics.median(o / n for n, o in zip(times["new"], times["old"]))
    return statistics.median(times["new"]), statistics.median(times["old"]), ratio


def print_profile(name: str, fn, store: Path, top: int) -> None:
    profile = cProfile.Profile()
    profile.runcall(fn, store)
    print(f"--- {name}: top {top} by own time")
    pstats.Stats(profile).sort_stats("tottime").print_stats(top)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=200)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--sequences-per-shard", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--teacher", help="teacher to capture with (default: the tiny offline teacher), e.g. "
                    "embedded:smollm2-135m-instruct")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N cProfile entries")
    ap.add_argument("--baseline", type=Path, help="a checkout of another commit: its loader is timed too")
    ap.add_argument("--workers", type=lambda v: [int(w) for w in v.split(",")], default=[],
                    help="also time the loader with these DataLoader worker counts, e.g. 1,2 (cases loader-wN)")
    ap.add_argument("--file-system", action="store_true", help="with --workers, also time workers that send batches "
                    "by the file_system sharing strategy (cases loader-wN-fs)")
    ap.add_argument("--stages", action="store_true", help="also time each stage by itself (CPU time)")
    ap.add_argument("--store", type=Path, help="read this store instead of capturing one")
    ap.add_argument("--keep", type=Path, help="copy the captured store here (for a later --store)")
    csv_argument(ap, "loader_speed.csv")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = ResultsFile(args.csv, COLUMNS)
    single_thread()
    cases = {
        "raw": lambda s: raw_read(s),
        "loader": lambda s: loader_read(s, args.batch_size),
        "loader-rows": lambda s: loader_read(s, args.batch_size, rows=True),
        "loader-noverify": lambda s: loader_read(s, args.batch_size, verify=False),
        "iterate-only": lambda s: loader_read(s, args.batch_size, collate=False),
    }
    for workers in args.workers:
        cases[f"loader-w{workers}"] = WorkersPass(args.batch_size, workers)
        if args.file_system:
            cases[f"loader-w{workers}-fs"] = WorkersPass(args.batch_size, workers, "file_system")
    workdir = Path(tempfile.mkdtemp(prefix="lc-loader-bench-"))
    if args.baseline:
        cases["baseline"] = partial(loader_read, batch_size=args.batch_size,
                                    dataset_class=baseline_dataset(args.baseline, workdir))
    try:
        store = args.store or workdir / "store"
        if args.store is None:
            make_store(store, args.seq_len, args.sequences, args.samples, args.sequences_per_shard, args.teacher)
            if args.keep:
                shutil.copytree(store, args.keep)
        positions = {name: fn(store) for name, fn in cases.items()}  # warm-up: page cache, imports
        times = interleave({name: partial(timed, fn, store) for name, fn in cases.items()}, args.repeats,
                           warmup=False)
        stages = stage_times(store, args.batch_size, args.repeats) if args.stages else {}
        paired = paired_cpu(cases["loader"], cases["baseline"], store, 2 * args.repeats + 1) if args.baseline else None
        for name in [c for c in ("loader", "loader-rows", "baseline") if c in cases] if args.profile else ():
            print_profile(name, cases[name], store, args.profile)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = dict(provenance(), threads=1)
    # the store's teacher (or, read with --store, the store) after each case name; none: the tiny teacher
    label = f"@{args.store.name}" if args.store else "" if args.teacher is None else f"@{args.teacher.rpartition(':')[2]}"
    print(f"store {args.store or args.teacher or 'tiny'}; machine load {machine_load()}")
    rows = []
    for name in cases:
        seconds = statistics.median(times[name])
        case = name + label
        rows.append({**meta, "case": case, "positions": positions[name],
                     "seconds": round(seconds, 5), "positions_per_s": round(positions[name] / seconds, 1)})
        print(f"{name:16s} positions={positions[name]} seconds={seconds:.4f} "
              f"positions/s={positions[name] / seconds:,.0f}", flush=True)
    for name, case in cases.items():  # the training process's CPU per pass where workers read
        if isinstance(case, WorkersPass):
            stages[name] = min(case.cpu[1:])  # the first call (the warm-up) forked the workers
    for name, seconds in stages.items():
        case, count = f"cpu:{name}{label}", positions["loader"]
        rows.append({**meta, "case": case, "positions": count, "seconds": round(seconds, 5),
                     "positions_per_s": round(count / seconds, 1)})
        print(f"{'cpu:' + name:16s} positions={count} cpu seconds={seconds:.4f} positions/s={count / seconds:,.0f}")
    if paired:
        new, old, ratio = paired
        for name, seconds in (("cpu:loader-paired", new), ("cpu:baseline-paired", old)):
            count = positions["loader"]
            rows.append({**meta, "case": name + label, "positions": count, "seconds": round(seconds, 5),
                         "positions_per_s": round(count / seconds, 1)})
            print(f"{name:20s} positions={count} cpu seconds={seconds:.4f} positions/s={count / seconds:,.0f}")
        print(f"loader ÷ baseline, paired CPU time: {ratio:.3f}")
    out.append(rows)


if __name__ == "__main__":
    main()
