"""The documents layout and chat data in numbers (issue #14), on the embedded teacher (SmolLM2-135M-Instruct,
bf16, CPU); one function per measurement, one metric per CSV row (benchmarks/results/chat_layout.csv):

* ``bytes``: RS-KD N=50 and top-64 captures of the same first ``--bytes-tokens`` tokens (whole
  conversations) of ``builtin:pydoc-chat``, ``train_on`` all and assistant: shard bytes per trained position
  and per conversation, assistant ÷ all (their positions/s are single runs, not a comparison);
* ``capture_speed``: ``builtin:pydoc`` in the ``documents`` (``split``) and ``packed`` layouts, same tokens,
  seq_len 512, interleaved: trained positions/s, teacher tokens/s, tokens computed (padding included)/s;
* ``teacher_padding``: tokens computed ÷ tokens in the sequences, exactly, from the whole corpora's plans
  (each unit's ``pipeline.sequence_batches``, each bucket padded to ``teachers.base.bucket_length``), and the
  share of positions that train;
* ``loader``: the RS-KD assistant store through a ``DataLoader``, one thread, interleaved: ``collate``
  (padded), ``collate_packed`` (the same batches padding-free), ``pack_tokens`` rows: positions/s, padding left.

    python benchmarks/chat_layout.py --png docs/img/chat_layout.png
    python benchmarks/chat_layout.py --quick --csv /tmp/chat_layout.csv      # a smoke run
    python benchmarks/chat_layout.py --replot benchmarks/results/chat_layout.csv --png docs/img/chat_layout.png
"""

from __future__ import annotations

import argparse
import csv
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
        blank = dict.fromkeys(COLUMNS[len(PROVENANCE) + 2:], "")
        for metric, v in metrics.items():
            self.rows.append({**self.meta, **blank, **context, "metric": metric,
                              "value": round(float(v), 4 if abs(v) < 10 else 1)})
            print_row(self.rows[-1])


def value(rows: list[dict], **where: object) -> float:
    """The one value among ``rows`` (this run's, or a CSV's as strings) whose row has ``where``."""
    found = [r["value"] for r in rows if all(str(r[k]) == str(v) for k, v in where.items())]
    if len(found) != 1:
        raise KeyError(f"expected one row with {where}; found {len(found)}")
    return float(found[0])


def latest_run(path: Path) -> list[dict]:
    """The rows of the latest run in a CSV this script wrote (``--replot``)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if r["timestamp"] == rows[-1]["timestamp"]]


def config_for(base: CaptureConfig, store: Path | None, **corpus: object) -> CaptureConfig:
    """``base`` with the ``corpus.*`` settings given, writing to ``store`` (None: a plan only)."""
    overrides = {f"corpus.{k}": v for k, v in corpus.items()}
    return base.with_overrides(overrides if store is None else {"store.path": str(store), **overrides})


def plan_of(config: CaptureConfig, teacher):  # what capture_local plans for ``config``
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
                metrics["bytes_vs_all"] = shard_bytes / value(rows.rows, case=f"{name}/all", metric="shard_bytes")
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
                         padding_overhead=computed / read, trained_fraction=plan.positions / read)


LOADER_CASES = ("padded", "packed", "pack-tokens")


def loader_pass(store: Path, case: str, batch_size: int, pack_tokens: int, epochs: int) -> dict[str, int]:
    """``epochs`` shuffled epochs through a DataLoader: ``padded`` (``collate``, ``[B, T]``), ``packed``
    (``collate_packed``: the same B sequences in one row) or ``pack-tokens`` (``CacheDataset(pack_tokens=N)``:
    rows of at most N tokens). Counts real positions, trained positions, batches and batch cells."""
    if case == "pack-tokens":
        ds = CacheDataset(store, shuffle=True, seed=0, pack_tokens=pack_tokens)
        loader = DataLoader(ds, batch_size=None, num_workers=0)
    else:
        ds = CacheDataset(store, shuffle=True, seed=0, batch_size=batch_size)
        collate = ds.collate_packed if case == "packed" else ds.collate
        loader = DataLoader(ds, batch_size=batch_size, num_workers=0, collate_fn=collate)
    counts = {"positions": 0, "trained": 0, "batches": 0, "cells": 0}
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            ids = batch["input_ids"]
            counts["positions"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
            counts["trained"] += int((batch["labels"] != -100).sum())
            counts["batches"] += 1
            counts["cells"] += ids.numel()
    return counts


def measure_loader(rows: Rows, store: Path, batch_size: int, pack_tokens: int, epochs: int, repeats: int) -> None:
    """Padded vs padding-free batches of the same store (``epochs`` epochs a pass), interleaved; run last: it
    sets one thread for the rest of the process."""
    single_thread()
    args = (batch_size, pack_tokens, epochs)
    counts = {case: loader_pass(store, case, *args) for case in LOADER_CASES}  # warm-up
    seconds = interleave({case: partial(timed, loader_pass, store, case, *args)
                          for case in LOADER_CASES}, repeats, warmup=False)
    info = inspect_store(store)
    for case, c in counts.items():
        s = statistics.median(seconds[case])
        metrics = {"positions": c["positions"], "trained_positions": c["trained"], "batches": c["batches"],
                   "seconds": s, "positions_per_s": c["positions"] / s, "trained_positions_per_s": c["trained"] / s,
                   "padding_fraction": 1 - c["positions"] / c["cells"]}
        if case == "pack-tokens":
            metrics["budget_fill"] = c["positions"] / (c["batches"] * pack_tokens)
        rows.add({"measurement": "loader", "corpus": CHAT, "layout": "documents", "train_on": "assistant",
                  "long_sequences": info["corpus"]["layout"]["long_sequences"], "method": "sample-50",
                  "seq_len": info["seq_len"],
                  "case": f"{case}/{pack_tokens} tokens" if case == "pack-tokens" else f"{case}/batch {batch_size}"},
                 **metrics)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=CaptureConfig().teacher.model)
    ap.add_argument("--bytes-tokens", type=int, default=8192, help="tokens of pydoc-chat per bytes capture")
    ap.add_argument("--bytes-seq-len", type=int, default=512)
    ap.add_argument("--speed-tokens", type=int, default=3072, help="tokens of pydoc per throughput capture")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the capture throughput")
    ap.add_argument("--seq-lens", default="512,1024,2048", help="seq_lens of the teacher padding plans")
    ap.add_argument("--batch-size", type=int, default=8, help="loader batch size (sequences)")
    ap.add_argument("--pack-tokens", type=int, default=4096, help="token budget of a pack-tokens loader row")
    ap.add_argument("--loader-epochs", type=int, default=4, help="epochs (shuffled orders) per loader pass")
    ap.add_argument("--loader-repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes: 1024 / 1024 tokens, 1 round, 512 only")
    csv_argument(ap, "chat_layout.csv")
    ap.add_argument("--png", type=Path, default=None, help="draw the four measurements here")
    ap.add_argument("--replot", type=Path, metavar="CSV", help="measure nothing: draw --png from this CSV's latest run")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.replot:
        if not args.png:
            parser().error("--replot draws a figure: give --png too")
        return plot(latest_run(args.replot), args.png)
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
        measure_loader(rows, store, args.batch_size, args.pack_tokens, args.loader_epochs, args.loader_repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.append(rows.rows)
    if args.png:
        plot(rows.rows, args.png)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(11, 8))
    for name, offset in zip(METHODS, (-0.2, 0.2)):
        kib = [value(rows, case=f"{name}/{t}", metric="bytes_per_conversation") / 1024 for t in ("all", "assistant")]
        a.bar([offset, 1 + offset], kib, width=0.4, label=name)
    a.set(xticks=[0, 1], xticklabels=["train_on all", "train_on assistant"], ylabel="KiB per conversation (pydoc-chat)")
    a.legend()
    metrics = ("trained_positions_per_s", "teacher_tokens_per_s", "computed_tokens_per_s")
    ratios = [value(rows, case="documents", metric=m) / value(rows, case="packed", metric=m) for m in metrics]
    b.bar([m.removesuffix("_per_s").replace("_", " ") for m in metrics], ratios, color="tab:green")
    b.axhline(1.0, color="gray", lw=0.8)
    b.set_ylabel("capture per second: documents ÷ packed (pydoc)")
    for source in (CHAT, TEXT):
        for policy, style in (("truncate", "-"), ("split", "--")):
            pad = [r for r in rows if r["measurement"] == "teacher_padding" and r["corpus"] == source
                   and r["long_sequences"] == policy and r["metric"] == "padding_overhead"]
            c.plot([int(r["seq_len"]) for r in pad], [float(r["value"]) for r in pad], style, marker="o",
                   label=f"{source} {policy}")
    c.set(xlabel="seq_len", ylabel="teacher tokens computed ÷ in sequences")
    c.legend()
    loader = [r for r in rows if r["measurement"] == "loader" and r["metric"] == "positions_per_s"]
    d.bar([r["case"].replace("/", "\n") for r in loader], [float(r["value"]) / 1000 for r in loader],
          color="tab:purple")
    d.set_ylabel("loader k positions/s (one thread)")
    fig.suptitle(f"documents layout and chat data ({rows[0]['teacher']}, {rows[0]['machine']}, "
                 f"commit {rows[0]['commit']})")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
