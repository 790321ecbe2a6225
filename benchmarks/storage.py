"""Bytes per position, write and read speed, per method × container × encoding, on real SmolLM2 targets.

For each method the teacher captures the same pydoc windows once (lossless float32, arrow); every
other variant is written from those decoded targets by the real encoder and container, then read
back through ``iter_sequences`` (checksums, container decode, row decode). ``plain-zstd`` is the
generic baseline: int32 ids, float32 logprobs, uint8/uint16 counts as Arrow list columns with zstd,
no encoding.

    python benchmarks/storage.py --tokens 32768 --png docs/img/storage.png   # rows: results/storage.csv
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import PROVENANCE, ResultsFile, csv_argument, provenance, pyplot, save_figure

import numpy as np
import pyarrow as pa

from logitcache.capture import capture
from logitcache.store.writer import encode_unit
from logitcache.capture.config import CaptureConfig
from logitcache.store import inspect_store, read_manifest
from logitcache.store.fs import StoreFS
from logitcache.store.commit import begin_store, commit_unit, finalize_store
from logitcache.store.reader import iter_sequences
from logitcache.store.spec import spec_from_manifest
from logitcache.store.containers import get_container
from logitcache.capture.teachers import load_teacher

METHODS = {
    "topk-12": {"method": "topk", "k": 12},
    "topk-50": {"method": "topk", "k": 50},
    "topk-64": {"method": "topk", "k": 64},
    "sample-50": {"method": "sample", "samples": 50},
    "sample-150": {"method": "sample", "samples": 150},
    "hybrid-12+50": {"method": "hybrid", "k": 12, "samples": 50},
}
# (container, ids, logprobs, entropy stage); logprobs only matter for methods with a head
VARIANTS = [("arrow", "rank-delta", "float32", "zstd"), ("arrow", "packed", "float32", "zstd"),
            ("arrow", "rank-delta", "float16", "zstd"), ("arrow", "rank-delta", "q8", "zstd"),
            ("zarr", "rank-delta", "float32", "zstd"), ("zarr", "rank-delta", "q8", "zstd"),
            ("arrow", "rank-delta", "float32", "ans"), ("arrow", "rank-delta", "q8", "ans"),
            ("zarr", "rank-delta", "float32", "ans"), ("zarr", "rank-delta", "q8", "ans")]
COLUMNS = PROVENANCE + ("method", "container", "encoding", "bytes_per_position", "ids_per_position", "write_mb_s",
                        "read_mb_s", "read_positions_s", "max_prob_error", "positions")


def plain_zstd_bytes(rows, level: int) -> int:
    """The generic baseline: list columns of raw values, zstd over Arrow buffers."""
    cols: dict[str, list] = {"tokens": [r[1] for r in rows]}
    for name in ("head_ids", "head_logprobs", "tail_mass", "sample_lengths", "sample_ids", "sample_counts",
                 "sample_weights"):
        values = [getattr(r[2], name) for r in rows]
        if values[0] is not None:
            cols[name] = [v.reshape(-1).numpy() for v in values]
    if "sample_counts" in cols:
        cols["sample_counts"] = [c.astype(np.uint8) for c in cols["sample_counts"]]
        cols["sample_lengths"] = [c.astype(np.uint16) for c in cols["sample_lengths"]]
    table = pa.table({"seq_id": pa.array([r[0] for r in rows], pa.uint64()),
                      **{k: pa.array(list(v)) for k, v in cols.items()}})
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=level))
    with pa.ipc.new_stream(sink, table.schema, options=opts) as w:
        w.write_table(table)
    return sink.getvalue().size


def rewrite(src: Path, dst: Path, rows, fmt: str, ids: str, logprobs: str, entropy: str, level: int) -> float:
    """Write ``rows`` (decoded from ``src``) as a store with another encoding; returns seconds."""
    from logitcache.store.convert import destination_header

    manifest = read_manifest(src)
    header = destination_header(StoreFS(src), manifest, format=fmt, ids=ids, logprob_dtype=logprobs,
                                compression=None, compression_level=level, entropy=entropy)
    spec = spec_from_manifest(header)
    fs = StoreFS(dst)
    per = spec.sequences_per_shard
    t0 = time.perf_counter()
    begin_store(fs, header, get_container(fmt).static_objects(spec), overwrite=False)
    records = []
    for index in range(-(-len(rows) // per)):
        part = rows[index * per:(index + 1) * per]
        record, objects = encode_unit(spec, index, [r[0] for r in part], [r[1] for r in part], [r[2] for r in part])
        commit_unit(fs, record, objects)
        records.append(record)
    finalize_store(fs, header, records)
    return time.perf_counter() - t0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--level", type=int, default=9, help="zstd level")
    ap.add_argument("--methods", default=",".join(METHODS))
    csv_argument(ap, "storage.csv")
    ap.add_argument("--png", type=Path, help="draw bytes per position by method and encoding here")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = ResultsFile(args.csv, COLUMNS)
    work = Path(tempfile.mkdtemp(prefix="lc-storage-"))
    base = CaptureConfig().with_overrides({"corpus.max_tokens": args.tokens, "corpus.seq_len": args.seq_len,
                                           "store.compression_level": args.level})
    teacher = load_teacher(base.teacher)
    rows_out = []
    prov = provenance()
    try:
        for name in args.methods.split(","):
            params = METHODS[name]
            src = work / name / "captured"
            cfg = base.with_overrides({f"sparsify.{k}": v for k, v in params.items()} | {"store.path": str(src)})
            capture(cfg, progress=False, teacher=teacher)
            rows = list(iter_sequences(src))
            positions = sum(r[2].num_positions for r in rows)
            rows_out.append(dict(prov, method=name, container="arrow", encoding="plain-zstd",
                                 bytes_per_position=round(plain_zstd_bytes(rows, args.level) / positions, 2),
                                 ids_per_position="", write_mb_s="", read_mb_s="", read_positions_s="",
                                 max_prob_error=0.0, positions=positions))
            has_head = rows[0][2].head_ids is not None
            for fmt, ids, logprobs, entropy in VARIANTS:
                if logprobs != "float32" and not has_head:
                    continue
                dst = work / name / f"{fmt}-{ids}-{logprobs}-{entropy}"
                seconds = rewrite(src, dst, rows, fmt, ids, logprobs, entropy, args.level)
                info = inspect_store(dst)
                t0 = time.perf_counter()
                n = sum(1 for _ in iter_sequences(dst))
                read_s = time.perf_counter() - t0
                assert n == len(rows)
                mb = info["bytes_on_disk"] / 1e6
                label = f"{info['encoding']['ids']}/{logprobs}" + ("+ans" if entropy == "ans" else "")
                row = dict(prov, method=name, container=fmt, encoding=label,
                           bytes_per_position=round(info["bytes_per_position"], 2),
                           ids_per_position=round(info["mean_ids_per_position"], 2),
                           write_mb_s=round(mb / seconds, 2), read_mb_s=round(mb / read_s, 2),
                           read_positions_s=round(positions / read_s), max_prob_error=info["max_prob_error"],
                           positions=positions)
                rows_out.append(row)
                print({k: row[k] for k in ("method", "container", "encoding", "bytes_per_position", "write_mb_s",
                                           "read_mb_s", "read_positions_s", "max_prob_error")}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.append(rows_out)
    if args.png:
        plot(rows_out, args.png)


def plot(rows, path: Path) -> None:
    plt = pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    labels = list(dict.fromkeys(f"{r['container']} {r['encoding']}" for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        values = [next((r["bytes_per_position"] for r in rows if r["method"] == m and
                        f"{r['container']} {r['encoding']}" == label), np.nan) for m in methods]
        ax.bar(np.arange(len(methods)) + j * width, values, width, label=label, color=plt.cm.tab20(j % 20))
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods)
    ax.set_ylabel("bytes per position on disk")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M on pydoc: storage by method and encoding (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
