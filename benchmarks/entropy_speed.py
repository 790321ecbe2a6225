"""Read and write speed of the ``ans`` entropy stage against zstd alone, on the same real SmolLM2 targets.

Per method (RS-KD N = 50 lossless, top-64 with q8 logprobs), the teacher captures ``--tokens``
pydoc positions once; the decoded targets are then written as two Arrow stores that differ only
in ``encoding.entropy`` (``zstd``, ``ans``) by the real encoder and commit path, and read back
through ``iter_sequences`` (sha256 of every object, container decode, the ``ans`` unit decode,
row decode). Writes and reads of all four stores are interleaved over ``--repeats`` rounds on one
thread (median reported), each ``ans`` case right after its zstd twin; ``vs_zstd`` is the median over
rounds of a case's speed over its twin's in the same round (so a burst of load elsewhere, which spans
neighbouring cases, mostly cancels out of the ratio).
Op ``stage`` times the entropy stage by itself on the same units: ``ans`` undoes the stage of every unit
(``entropy.unpack_unit`` on the container's columns), ``zstd`` decompresses the bytes of the same streams as the zstd
store holds them (one zstd-9 frame per stream per unit, through one reused context), what zstd spends on them inside
the container's read. An ``ans`` read can only match a zstd read where this stage costs about what zstd's does.
``--clock cpu`` times each case by the process's CPU time instead of the wall clock: on a machine
where other jobs take the cores (a ``nice``d run is preempted mid-read) the wall clock charges their
time to whichever case was running.

    python benchmarks/entropy_speed.py --keep /tmp/entropy-speed   # rows: results/entropy_speed.csv

``--keep DIR`` keeps the captured targets there and reuses them on the next run (the capture is
the slow part, and the same inputs make a before/after comparison exact).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from common import (PROVENANCE, ResultsFile, csv_argument, interleave, machine_load, print_row, provenance,
                    single_thread, timed)
from storage import rewrite

from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig
from logitcache.store import read_manifest
from logitcache.store.containers import get_container
from logitcache.store.containers.zstd_context import decompressor
from logitcache.store.entropy import coded_columns, unpack_unit
from logitcache.store.fs import StoreFS
from logitcache.store.reader import iter_sequences, read_unit
from logitcache.store.spec import spec_from_manifest

METHODS = {  # name: (sparsify overrides, logprob code)
    "sample-50": ({"method": "sample", "samples": 50}, "float32"),
    "topk-64": ({"method": "topk", "k": 64}, "q8"),
}
ENTROPY = ("zstd", "ans")
COLUMNS = PROVENANCE + ("threads", "load", "clock", "method", "logprobs", "entropy", "op", "positions", "seconds",
                        "positions_per_s", "vs_zstd")


def captured(work: Path, name: str, tokens: int, seq_len: int) -> list:
    """The decoded rows of ``name``'s capture under ``work`` (captured first if not there yet)."""
    src = work / name / "captured"
    if not (src / "manifest.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        params, _ = METHODS[name]
        capture(CaptureConfig().with_overrides({"corpus.max_tokens": tokens, "corpus.seq_len": seq_len,
                                                "store.path": str(src)}
                                               | {f"sparsify.{k}": v for k, v in params.items()}), progress=False)
    return list(iter_sequences(src))


def write_case(work: Path, name: str, entropy: str, rows, clock: str) -> float:
    dst = work / name / f"{entropy}-{time.perf_counter_ns()}"
    start = time.process_time()
    seconds = rewrite(work / name / "captured", dst, rows, "arrow", "rank-delta", METHODS[name][1], entropy, 9)
    cpu = time.process_time() - start  # the rewrite and nothing else (it reports its wall time itself)
    shutil.rmtree(dst)
    return cpu if clock == "cpu" else seconds


def cpu_timed(fn, *args) -> float:
    """CPU seconds (this process, all its threads: one here) of one call ``fn(*args)``."""
    start = time.process_time()
    fn(*args)
    return time.process_time() - start


def read_all(store: Path) -> int:
    return sum(targets.num_positions for _, _, targets in iter_sequences(store))


def stage_case(store: Path, entropy: str):
    """What the entropy stage alone decodes in every unit of ``store`` (module docstring, op ``stage``), as a
    function that decodes it all."""
    fs = StoreFS(store)
    manifest = read_manifest(fs)
    spec = spec_from_manifest(manifest.header)
    if entropy == "ans":
        container = get_container(spec.format)
        units = [container.decode_unit(spec, r.index, 0, r.sequences, {o.path: fs.read(o.path) for o in r.objects})
                 for r in manifest.shards]
        return lambda: [unpack_unit(spec, unit) for unit in units]
    import zstandard

    level = zstandard.ZstdCompressor(level=9)
    frames = [level.compress(read_unit(fs, spec, r).columns[name][0].tobytes())
              for r in manifest.shards for name in coded_columns(spec)]
    return lambda: [decompressor().decompress(frame) for frame in frames]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="positions captured per method")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--keep", type=Path, help="keep (and reuse) the captured targets in this directory")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time cases by the wall clock or by this process's CPU time (for a busy machine)")
    csv_argument(ap, "entropy_speed.csv")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = ResultsFile(args.csv, COLUMNS)
    single_thread()
    work = args.keep or Path(tempfile.mkdtemp(prefix="lc-entropy-speed-"))
    try:
        rows = {name: captured(work, name, args.tokens, args.seq_len) for name in METHODS}
        for name, entropy in ((n, e) for n in METHODS for e in ENTROPY):
            shutil.rmtree(work / name / entropy, ignore_errors=True)
            rewrite(work / name / "captured", work / name / entropy, rows[name], "arrow", "rank-delta",
                    METHODS[name][1], entropy, 9)
        read = timed if args.clock == "wall" else cpu_timed
        cases = {(n, e, op): partial(read, read_all, work / n / e) if op == "read" else  # ans right after zstd
                 partial(write_case, work, n, e, rows[n], args.clock)
                 for n in METHODS for op in ("read", "write") for e in ENTROPY}
        cases |= {(n, e, "stage"): partial(read, stage_case(work / n / e, e)) for n in METHODS for e in ENTROPY}
        times = interleave(cases, args.repeats)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    meta = dict(provenance(), threads=1, load=machine_load(), clock=args.clock)
    speed = {key: sum(r[2].num_positions for r in rows[key[0]]) / statistics.median(s) for key, s in times.items()}
    results = []
    for (name, entropy, op), seconds in times.items():
        positions, twin = sum(r[2].num_positions for r in rows[name]), times[name, "zstd", op]
        results.append({**meta, "method": name, "logprobs": METHODS[name][1], "entropy": entropy, "op": op,
                        "positions": positions, "seconds": round(statistics.median(seconds), 5),
                        "positions_per_s": round(speed[name, entropy, op]),
                        "vs_zstd": round(statistics.median(z / t for z, t in zip(twin, seconds)), 3)})
        print_row(results[-1])
    out.append(results)


if __name__ == "__main__":
    main()
