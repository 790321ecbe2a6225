"""Capture throughput ÷ bare teacher forward throughput, and bytes per position, in one run.

The baseline is the teacher's own forward with full logits (``model(input_ids).logits``, what a
user would run without capture) on the same windows and batch size. The capture side is the whole
``logitcache.capture.capture`` call — planning excluded — teacher body, chunked head,
sparsification, Arrow encoding, checksums, fsync and manifest. Repeats are interleaved
(bare, capture, bare, capture, …) so drift on a shared machine hits both sides alike.

Rows append to benchmarks/results/capture_speed.csv (``--csv`` to write elsewhere).

    python benchmarks/capture_speed.py --png docs/img/capture_speed.png
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from functools import partial
from pathlib import Path

from common import (PROVENANCE, ResultsFile, capture_arguments, csv_argument, interleave, print_row, provenance,
                    pyplot, save_figure, timed)

import torch

from logitcache.capture import capture
from logitcache.capture.pipeline import encode_threads
from logitcache.capture.config import CaptureConfig
from logitcache.capture.corpus import read_documents
from logitcache.capture.plan import build_plan
from logitcache.store import inspect_store
from logitcache.capture.teachers import load_teacher

METHODS = {
    "topk-64": {"method": "topk", "k": 64},
    "sample-50": {"method": "sample", "samples": 50},
    "hybrid-12+50": {"method": "hybrid", "k": 12, "samples": 50},
}
COLUMNS = PROVENANCE + ("teacher", "dtype", "method", "positions", "batch_windows", "head_chunk", "encode_threads",
                        "bare_tok_s", "capture_tok_s", "ratio", "bytes_per_position", "ids_per_position")


def bare_forward(teacher, windows: torch.Tensor, per_batch: int) -> None:
    """The baseline: the teacher's forward with full logits, batch by batch (each dropped at once)."""
    for i in range(0, windows.shape[0], per_batch):
        teacher.bare_forward(windows[i:i + per_batch, :-1])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    capture_arguments(ap)
    ap.add_argument("--device", default="auto", help="teacher device: auto (cuda when present), cpu, cuda")
    ap.add_argument("--encode-threads", type=int, default=0, help="capture's encode threads (0 = auto)")
    ap.add_argument("--head-chunk", type=int, default=CaptureConfig().teacher.head_chunk,
                    help="positions per output-head chunk (larger suits a GPU)")
    ap.add_argument("--teacher", default=CaptureConfig().teacher.model)
    ap.add_argument("--methods", default=",".join(METHODS))
    csv_argument(ap, "capture_speed.csv")
    ap.add_argument("--png", type=Path, default=None, help="draw the ratios and bytes per position here")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = ResultsFile(args.csv, COLUMNS)
    base = CaptureConfig().with_overrides({
        "teacher.model": args.teacher, "teacher.dtype": args.dtype, "teacher.device": args.device,
        "teacher.head_chunk": args.head_chunk, "encode_threads": args.encode_threads, "corpus.seq_len": args.seq_len,
        "corpus.max_tokens": args.tokens, "batch_tokens": args.batch_tokens})
    teacher = load_teacher(base.teacher)
    plan = build_plan(read_documents(base.corpus.source), teacher.tokenizer, seq_len=args.seq_len,
                      max_tokens=args.tokens, eos_id=teacher.eos_id, max_positions=teacher.max_positions)
    windows = torch.stack([torch.from_numpy(plan.window(i)).long() for i in range(plan.num_windows)])
    positions = plan.num_windows * plan.seq_len
    per_batch = max(1, args.batch_tokens // (args.seq_len + 1))
    bare_forward(teacher, windows[:per_batch], per_batch)  # warm-up
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="lc-bench-"))
    try:
        for name in args.methods.split(","):
            overrides = {f"sparsify.{k}": v for k, v in METHODS[name].items()}
            config = base.with_overrides({**overrides, "store.path": str(workdir / name)})
            seconds = interleave({
                "bare": partial(timed, bare_forward, teacher, windows, per_batch),
                "capture": lambda: capture(config, overwrite=True, progress=False, teacher=teacher).seconds,
            }, args.repeats, warmup=False)
            bare, capt = statistics.median(seconds["bare"]), statistics.median(seconds["capture"])
            info = inspect_store(workdir / name)
            row = {
                **provenance(), "teacher": teacher.name, "dtype": args.dtype,
                "method": name, "positions": positions, "batch_windows": per_batch, "head_chunk": args.head_chunk,
                "encode_threads": encode_threads(config),
                "bare_tok_s": round(positions / bare, 1), "capture_tok_s": round(positions / capt, 1),
                "ratio": round(bare / capt, 3),
                "bytes_per_position": round(info["bytes_per_position"], 1),
                "ids_per_position": round(info["mean_ids_per_position"], 2),
            }
            rows.append(row)
            print_row(row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out.append(rows)
    if args.png:
        plot(rows, args.png)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["method"] for r in rows]
    a.bar(names, [r["ratio"] for r in rows], color="tab:blue")
    a.axhline(1.0, color="gray", lw=0.8)
    a.axhline(0.9, color="tab:red", lw=0.8, ls="--", label="target 0.90")
    a.set_ylabel("capture ÷ bare forward throughput")
    a.legend()
    b.bar(names, [r["bytes_per_position"] for r in rows], color="tab:green")
    b.set_ylabel("bytes per position on disk")
    fig.suptitle(f"capture vs bare forward ({rows[0]['teacher']}, {rows[0]['dtype']}, {rows[0]['machine']})")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
