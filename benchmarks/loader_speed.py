"""Training loader throughput (positions/s on one core) against a raw read of the same shard files.

Captures a store with the tiny offline teacher (default: seq_len 128, 200 sequences, sample N=50)
in a temporary directory, then times, interleaved over ``--repeats`` rounds (median reported):

* ``raw``: ``pyarrow`` memory-map + ``read_all`` (zstd decompression) of every shard's columns —
  the floor for reading these bytes, without decoding the compact row encoding;
* ``loader``: iterate ``CacheDataset`` (shuffle, ``verify=True``: each shard's sha256 checked when
  it is read; rows decoded from the compact encoding) through ``DataLoader(num_workers=0, batch_size, collate_fn=ds.collate)``;
* ``loader-noverify``: the same with ``verify=False``;
* ``iterate-only``: ``CacheDataset`` items without collation.

Everything runs on one thread (``torch.set_num_threads(1)``, ``pyarrow.set_cpu_count(1)``).

    python benchmarks/loader_speed.py          # appends to benchmarks/results/loader_speed.csv
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from functools import partial
from pathlib import Path

from common import PROVENANCE, ResultsFile, csv_argument, interleave, provenance, single_thread, timed

import pyarrow as pa
from torch.utils.data import DataLoader

from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig
from logitcache.train.dataset import CacheDataset
from logitcache.store import read_manifest

COLUMNS = PROVENANCE + ("threads", "case", "positions", "seconds", "positions_per_s")


def make_store(path: Path, seq_len: int, sequences: int, samples: int, per_shard: int) -> None:
    from logitcache.testing.tiny import make_tiny_teacher

    teacher = make_tiny_teacher(path.parent / "tiny_teacher")
    capture(CaptureConfig().with_overrides({
        "teacher.model": teacher, "teacher.dtype": "float32", "corpus.seq_len": seq_len,
        "corpus.max_tokens": seq_len * sequences, "store.path": str(path),
        "store.sequences_per_shard": per_shard, "sparsify.method": "sample", "sparsify.samples": samples}),
        progress=False)


def raw_read(store: Path) -> int:
    positions = 0
    for record in read_manifest(store).shards:
        with pa.memory_map(str(store / record.objects[0].path)) as source:
            table = pa.ipc.open_stream(source).read_all()  # decompresses every column
        for name in table.schema.names:
            table.column(name).combine_chunks()
        positions += record.positions
    return positions


def loader_read(store: Path, batch_size: int, *, verify: bool, collate: bool) -> int:
    ds = CacheDataset(store, shuffle=True, seed=0, verify=verify, batch_size=batch_size)
    if not collate:
        return sum(int(item["input_ids"].numel()) for item in ds)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=0, collate_fn=ds.collate)
    return sum(int(batch["attention_mask"].sum()) for batch in loader)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=200)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--sequences-per-shard", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    csv_argument(ap, "loader_speed.csv")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = ResultsFile(args.csv, COLUMNS)
    single_thread()
    cases = {
        "raw": lambda s: raw_read(s),
        "loader": lambda s: loader_read(s, args.batch_size, verify=True, collate=True),
        "loader-noverify": lambda s: loader_read(s, args.batch_size, verify=False, collate=True),
        "iterate-only": lambda s: loader_read(s, args.batch_size, verify=True, collate=False),
    }
    workdir = Path(tempfile.mkdtemp(prefix="lc-loader-bench-"))
    try:
        store = workdir / "store"
        make_store(store, args.seq_len, args.sequences, args.samples, args.sequences_per_shard)
        positions = {name: fn(store) for name, fn in cases.items()}  # warm-up: page cache, imports
        times = interleave({name: partial(timed, fn, store) for name, fn in cases.items()}, args.repeats,
                           warmup=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = dict(provenance(), threads=1)
    rows = []
    for name in cases:
        seconds = statistics.median(times[name])
        rows.append({**meta, "case": name, "positions": positions[name],
                     "seconds": round(seconds, 5), "positions_per_s": round(positions[name] / seconds, 1)})
        print(f"{name:16s} positions={positions[name]} seconds={seconds:.4f} "
              f"positions/s={positions[name] / seconds:,.0f}", flush=True)
    out.append(rows)


if __name__ == "__main__":
    main()
