"""The documents layout and chat data in numbers (issue #14): bytes per trained position, capture and
loader throughput, and the padding each side computes or leaves.

Four measurements, one function each, on the embedded teacher (SmolLM2-135M-Instruct, bf16, CPU):

* ``bytes``: RS-KD N=50 and top-64 captures of the first ``--bytes-tokens`` tokens of
  ``builtin:pydoc-chat`` (whole conversations, the same ones in every row), ``train_on`` assistant and
  all: shard bytes per trained position and per conversation, and assistant ÷ all bytes;
* ``capture_speed``: ``builtin:pydoc`` captured in the ``documents`` and ``packed`` layouts (same
  ``--speed-tokens``, seq_len 512, ``split`` so both cover the same text), interleaved runs: trained
  positions/s, teacher tokens/s and padded tokens/s;
* ``teacher_padding``: tokens the teacher computes ÷ tokens in the sequences, from the plans exactly
  (each unit's sequences batched by ``pipeline.sequence_batches``, each bucket padded to
  ``teachers.base.bucket_length``), pydoc-chat and pydoc at ``--seq-lens``, truncate and split;
* ``loader``: ``CacheDataset`` through a ``DataLoader`` with ``collate`` (padded) and ``collate_packed``
  (padding-free) on the RS-KD ``bytes`` store, one thread: positions/s and the padding fraction left.

Rows (one metric each) append to benchmarks/results/chat_layout.csv.

    python benchmarks/chat_layout.py --png docs/img/chat_layout.png
    python benchmarks/chat_layout.py --quick --csv /tmp/chat_layout.csv      # a smoke run, ~1 minute
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from functools import partial
from pathlib import Path

from common import (PROVENANCE, ResultsFile, csv_argument, interleave, machine_load, print_row, provenance,
                    pyplot, save_figure, single_thread, timed)

from torch.utils.data import DataLoader

from logitcache.capture.config import CaptureConfig
from logitcache.capture.corpus import open_corpus
from logitcache.capture.documents import DocumentPlan
from logitcache.capture.pipeline import capture_local, make_plan, sequence_batches
from logitcache.capture.plan import plan_units
from logitcache.capture.teachers import load_teacher
from logitcache.capture.teachers.base import bucket_groups
from logitcache.store import inspect_store
from logitcache.train.dataset import CacheDataset

CHAT, TEXT = "builtin:pydoc-chat", "builtin:pydoc"
METHODS = {"sample-50": {"method": "sample", "samples": 50}, "topk-64": {"method": "topk", "k": 64}}
COLUMNS = PROVENANCE + ("load", "teacher", "measurement", "corpus", "layout", "long_sequences", "train_on", "method",
                        "seq_len", "case", "metric", "value")


class Rows:
    """The rows of one run: provenance once, a context per measurement, one metric a row."""

    def __init__(self, teacher: str) -> None:
        self.meta = {**provenance(), "load": machine_load(), "teacher": teacher}
        self.rows: list[dict] = []

    def add(self, context: dict, **metrics: float) -> None:
        for metric, value in metrics.items():
            blank = dict.fromkeys(COLUMNS[len(PROVENANCE) + 2:], "")
            row = {**self.meta, **blank, **context, "metric": metric, "value": _round(value)}
            self.rows.append(row)
            print_row(row)

    def value(self, **where: object) -> float:
        """The one value whose row has ``where`` (e.g. ``case=..., metric=...``)."""
        found = [r["value"] for r in self.rows if all(r[k] == v for k, v in where.items())]
        if len(found) != 1:
            raise KeyError(f"expected one row with {where}; found {len(found)}")
        return float(found[0])


def _round(value: float) -> float:
    return round(float(value), 4 if abs(value) < 10 else 1)


def config_for(base: CaptureConfig, store: Path | None, **corpus: object) -> CaptureConfig:
    """``base`` with the ``corpus.*`` settings given, writing to ``store`` (None: a plan only)."""
    overrides = {f"corpus.{k}": v for k, v in corpus.items()}
    return base.with_overrides(overrides if store is None else {"store.path": str(store), **overrides})


def plan_of(config: CaptureConfig, teacher):
    return make_plan(config, teacher, open_corpus(config.corpus.source))


def teacher_tokens(plan) -> int:
    """Tokens the teacher reads: every input position (a sequence's tokens but its last)."""
    if isinstance(plan, DocumentPlan):
        return int(plan.tokens.size - plan.num_sequences)
    return plan.positions


def computed_tokens(plan, config: CaptureConfig, max_positions: int) -> int:
    """Tokens the teacher computes, padding included: each unit's sequences in ``sequence_batches``,
    each batch's length buckets padded to their bucket length (as ``HFTeacher.forward_sequences`` does)."""
    if not isinstance(plan, DocumentPlan):
        return plan.positions  # packed windows are all seq_len long: no padding
    total = 0
    for unit in plan_units(plan, config.store.sequences_per_shard):
        lengths = [plan.sequence(i).tokens.size - 1 for i in range(unit.start, unit.stop)]
        for batch in sequence_batches(lengths, config.batch_tokens, max_positions):
            total += sum(padded * len(rows) for padded, rows in bucket_groups([lengths[i] for i in batch],
                                                                              max_positions))
    return total


def measure_bytes(rows: Rows, base: CaptureConfig, teacher, work: Path, tokens: int, seq_len: int) -> Path:
    """Bytes per trained position and per conversation, assistant vs all positions; returns the RS-KD
    assistant store (the loader's input)."""
    for name, params in METHODS.items():
        for train_on in ("all", "assistant"):  # "all" first: the assistant row reports its ratio to it
            store = work / f"{name}-{train_on}"
            config = config_for(base, store, source=CHAT, max_tokens=tokens, seq_len=seq_len, train_on=train_on)
            config = config.with_overrides({f"sparsify.{k}": v for k, v in params.items()})
            plan = plan_of(config, teacher)
            seconds = capture_local(config, overwrite=True, progress=False, teacher=teacher).seconds
            info = inspect_store(store)
            shard_bytes = info["bytes_per_position"] * info["positions"]
            context = {"measurement": "bytes", "corpus": CHAT, "layout": "documents", "train_on": train_on,
                       "long_sequences": config.corpus.long_sequences, "method": name, "seq_len": seq_len,
                       "case": f"{name}/{train_on}"}
            metrics = {"conversations": info["sequences"], "teacher_tokens": teacher_tokens(plan),
                       "trained_positions": info["positions"], "shard_bytes": shard_bytes,
                       "bytes_per_trained_position": info["bytes_per_position"],
                       "bytes_per_conversation": shard_bytes / info["sequences"],
                       "ids_per_position": info["mean_ids_per_position"],
                       "trained_positions_per_s": info["positions"] / seconds,
                       "teacher_tokens_per_s": teacher_tokens(plan) / seconds}
            if train_on == "assistant":
                metrics["bytes_vs_all"] = shard_bytes / rows.value(case=f"{name}/all", metric="shard_bytes")
            rows.add(context, **metrics)
    return work / "sample-50-assistant"


def measure_capture_speed(rows: Rows, base: CaptureConfig, teacher, work: Path, tokens: int, repeats: int) -> None:
    """Documents vs packed capture of the same text, interleaved (the bytes captures warmed the teacher)."""
    configs = {layout: config_for(base, work / f"speed-{layout}", source=TEXT, max_tokens=tokens, seq_len=512,
                                  layout=layout, long_sequences="split") for layout in ("documents", "packed")}
    seconds = interleave({layout: lambda c=config: capture_local(c, overwrite=True, progress=False,
                                                                 teacher=teacher).seconds
                          for layout, config in configs.items()}, repeats, warmup=False)
    for layout, config in configs.items():
        plan = plan_of(config, teacher)
        s = statistics.median(seconds[layout])
        computed = computed_tokens(plan, config, teacher.max_positions)
        rows.add({"measurement": "capture_speed", "corpus": TEXT, "layout": layout, "train_on": "all",
                  "long_sequences": "split", "method": "sample-50", "seq_len": 512, "case": layout},
                 sequences=plan.num_sequences, trained_positions=plan.positions, teacher_tokens=teacher_tokens(plan),
                 computed_tokens=computed, seconds=s, trained_positions_per_s=plan.positions / s,
                 teacher_tokens_per_s=teacher_tokens(plan) / s, computed_tokens_per_s=computed / s)


def measure_teacher_padding(rows: Rows, base: CaptureConfig, teacher, seq_lens: list[int]) -> None:
    """Tokens computed ÷ tokens in sequences for the documents plans of both corpora (whole corpora)."""
    for source in (CHAT, TEXT):
        for policy in ("truncate", "split"):
            for seq_len in seq_lens:
                config = config_for(base, None, source=source, seq_len=seq_len, layout="documents",
                                    long_sequences=policy)
                plan = plan_of(config, teacher)
                read, computed = teacher_tokens(plan), computed_tokens(plan, config, teacher.max_positions)
                rows.add({"measurement": "teacher_padding", "corpus": source, "layout": "documents",
                          "train_on": plan.layout.train_on, "long_sequences": policy, "seq_len": seq_len,
                          "case": f"{source}/{policy}/{seq_len}"},
                         sequences=plan.num_sequences, teacher_tokens=read, computed_tokens=computed,
                         padding_overhead=computed / read)


def loader_pass(store: Path, batch_size: int, packed: bool) -> dict[str, int]:
    """One shuffled epoch through a DataLoader: real positions, trained positions and batch cells."""
    ds = CacheDataset(store, shuffle=True, seed=0, batch_size=batch_size)
    collate = ds.collate_packed if packed else ds.collate
    counts = {"positions": 0, "trained": 0, "cells": 0}
    for batch in DataLoader(ds, batch_size=batch_size, num_workers=0, collate_fn=collate):
        counts["cells"] += batch["input_ids"].numel()
        counts["positions"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch[
            "input_ids"].numel()
        counts["trained"] += int((batch["labels"] != -100).sum())
    return counts


def measure_loader(rows: Rows, store: Path, batch_size: int, repeats: int) -> None:
    """Padded vs padding-free batches of the same store, one thread, interleaved."""
    single_thread()
    cases = {"padded": False, "packed": True}
    counts = {case: loader_pass(store, batch_size, packed) for case, packed in cases.items()}  # warm-up
    seconds = interleave({case: partial(timed, loader_pass, store, batch_size, packed)
                          for case, packed in cases.items()}, repeats, warmup=False)
    info = inspect_store(store)
    for case, c in counts.items():
        s = statistics.median(seconds[case])
        rows.add({"measurement": "loader", "corpus": CHAT, "layout": "documents", "train_on": "assistant",
                  "long_sequences": info["corpus"]["layout"]["long_sequences"], "method": "sample-50",
                  "seq_len": info["seq_len"], "case": f"{case}/batch {batch_size}"},
                 positions=c["positions"], trained_positions=c["trained"], seconds=s,
                 positions_per_s=c["positions"] / s, trained_positions_per_s=c["trained"] / s,
                 padding_fraction=1 - c["positions"] / c["cells"])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=CaptureConfig().teacher.model)
    ap.add_argument("--bytes-tokens", type=int, default=4096, help="tokens of pydoc-chat per bytes capture")
    ap.add_argument("--bytes-seq-len", type=int, default=2048)
    ap.add_argument("--speed-tokens", type=int, default=3072, help="tokens of pydoc per throughput capture")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the capture throughput")
    ap.add_argument("--seq-lens", default="512,1024,2048", help="seq_lens of the teacher padding plans")
    ap.add_argument("--batch-size", type=int, default=8, help="loader batch size (sequences)")
    ap.add_argument("--loader-repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes: 1024 / 1024 tokens, 1 round, 512 only")
    csv_argument(ap, "chat_layout.csv")
    ap.add_argument("--png", type=Path, default=None, help="draw the four measurements here")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args.bytes_tokens, args.speed_tokens, args.repeats, args.seq_lens, args.loader_repeats = 1024, 1024, 1, "512", 1
    out = ResultsFile(args.csv, COLUMNS)
    base = CaptureConfig().with_overrides({"teacher.model": args.teacher, "sparsify.method": "sample",
                                           "sparsify.samples": 50})  # the speed captures' method
    teacher = load_teacher(base.teacher)
    rows = Rows(teacher.name)
    work = Path(tempfile.mkdtemp(prefix="lc-chat-layout-"))
    try:
        store = measure_bytes(rows, base, teacher, work, args.bytes_tokens, args.bytes_seq_len)
        measure_capture_speed(rows, base, teacher, work, args.speed_tokens, args.repeats)
        measure_teacher_padding(rows, base, teacher, [int(s) for s in args.seq_lens.split(",")])
        measure_loader(rows, store, args.batch_size, args.loader_repeats)  # last: it sets one thread
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.append(rows.rows)
    if args.png:
        plot(rows, args.png)


def plot(rows: Rows, path: Path) -> None:
    plt = pyplot()
    fig, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(11, 8))
    for name, offset in zip(METHODS, (-0.2, 0.2)):
        values = [rows.value(case=f"{name}/{t}", metric="bytes_per_conversation") / 1024 for t in ("all", "assistant")]
        a.bar([offset, 1 + offset], values, width=0.4, label=name)
    a.set_xticks([0, 1], ["train_on all", "train_on assistant"])
    a.set_ylabel("KiB per conversation (pydoc-chat)")
    a.legend()
    speed = [r for r in rows.rows if r["measurement"] == "capture_speed" and r["metric"].endswith("_per_s")]
    labels = [f"{r['case']}\n{r['metric'].removesuffix('_per_s').replace('_', ' ')}" for r in speed]
    b.barh(labels, [r["value"] for r in speed], color="tab:green")
    b.set_xlabel("per second (builtin:pydoc, seq_len 512)")
    for source in (CHAT, TEXT):
        for policy, style in (("truncate", "-"), ("split", "--")):
            pad = [r for r in rows.rows if r["measurement"] == "teacher_padding" and r["corpus"] == source
                   and r["long_sequences"] == policy and r["metric"] == "padding_overhead"]
            c.plot([r["seq_len"] for r in pad], [r["value"] for r in pad], style, marker="o", label=f"{source} {policy}")
    c.set_xlabel("seq_len")
    c.set_ylabel("teacher tokens computed ÷ in sequences")
    c.legend()
    loader = [r for r in rows.rows if r["measurement"] == "loader" and r["metric"] == "positions_per_s"]
    d.bar([r["case"] for r in loader], [r["value"] / 1000 for r in loader], color="tab:purple")
    d.set_ylabel("loader k positions/s (one thread)")
    fig.suptitle(f"documents layout and chat data ({rows.meta['teacher']}, {rows.meta['machine']})")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
