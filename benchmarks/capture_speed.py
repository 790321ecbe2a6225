"""Capture throughput ÷ bare teacher forward throughput, and bytes per position, in one run.

The baseline is the teacher's own forward with full logits (``model(input_ids).logits``, what a
user would run without capture) on the same windows and batch size. The capture side is the whole
``logitcache.capture.capture`` call — planning excluded — teacher body, chunked head,
sparsification, Arrow encoding, checksums, fsync and manifest. Repeats are interleaved
(bare, capture, bare, capture, …) so drift on a shared machine hits both sides alike.

    python benchmarks/capture_speed.py --csv benchmarks/results/capture_speed.csv --png docs/img/capture_speed.png
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import provenance, synchronize, write_csv

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



def bare_forward_seconds(teacher, windows: torch.Tensor, per_batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, windows.shape[0], per_batch):
        logits = teacher.bare_forward(windows[i:i + per_batch, :-1])
        del logits
    synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="positions per measurement")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=4104)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto", help="teacher device: auto (cuda when present), cpu, cuda")
    ap.add_argument("--encode-threads", type=int, default=0, help="capture's encode threads (0 = auto)")
    ap.add_argument("--head-chunk", type=int, default=CaptureConfig().teacher.head_chunk,
                    help="positions per output-head chunk (larger suits a GPU)")
    ap.add_argument("--teacher", default=CaptureConfig().teacher.model)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--csv", default="benchmarks/results/capture_speed.csv")
    ap.add_argument("--png", default=None)
    args = ap.parse_args()

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
    bare_forward_seconds(teacher, windows[:per_batch], per_batch)  # warm-up
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="lc-bench-"))
    try:
        for name in args.methods.split(","):
            overrides = {f"sparsify.{k}": v for k, v in METHODS[name].items()}
            config = base.with_overrides({**overrides, "store.path": str(workdir / name)})
            bare, capt = [], []
            for _ in range(args.repeats):
                bare.append(bare_forward_seconds(teacher, windows, per_batch))
                summary = capture(config, overwrite=True, progress=False, teacher=teacher)
                capt.append(summary.seconds)
            info = inspect_store(workdir / name)
            row = {
                **provenance(), "teacher": teacher.name, "dtype": args.dtype,
                "method": name, "positions": positions, "batch_windows": per_batch, "head_chunk": args.head_chunk,
                "encode_threads": encode_threads(config),
                "bare_tok_s": round(positions / statistics.median(bare), 1),
                "capture_tok_s": round(positions / statistics.median(capt), 1),
                "ratio": round(statistics.median(bare) / statistics.median(capt), 3),
                "bytes_per_position": round(info["bytes_per_position"], 1),
                "ids_per_position": round(info["mean_ids_per_position"], 2),
            }
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items() if k not in ("timestamp", "machine", "torch")),
                  flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_csv(Path(args.csv), rows)
    if args.png:
        plot(rows, Path(args.png))



def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
