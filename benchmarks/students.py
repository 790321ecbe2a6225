"""Distil one student per target method — same data, order, steps, seed and init — and compare on
held-out pydoc: CE, KL(teacher ‖ student), top-1 agreement, ECE, and the fraction of the
CE-only → full-KD gap each method closes.

Teacher: SmolLM2-135M-Instruct (bf16). Student: the teacher cut to its first ``--layers`` decoder
layers (``init:embedded:smollm2-135m-instruct:<layers>``), fp32, with the tied token embedding /
output head frozen at the teacher's (so every student shares the teacher's head and learns its
layers and final norm). Training: AdamW (constant lr), grad clip 1.0, ``--steps`` batches of
``--batch`` windows of ``--seq-len`` tokens from the first windows of builtin:pydoc, one epoch
in a shuffled order fixed by the seed; the last ``--eval-windows`` windows are held out.

Targets come from real stores written by ``logitcache.capture.pipeline`` and read by ``CacheDataset`` +
``collate``; the losses are ``logitcache.kd_loss`` (α = 1: KD only; the CE-only baseline is
α = 0). The teacher's decoder runs once per window (``CachedBodyTeacher``); the full-KD reference
applies its head online to every training batch (``full_kd_loss``). With several seeds, the seed
changes the data order and the RS-KD / hybrid draws; the student init is the same.

ECE: 15 equal-width bins on the student's top-1 confidence, correctness = top-1 equals the next
token (``ece``) or equals the teacher's top-1 (``ece_vs_teacher``).

    python benchmarks/students.py --png docs/img/students --results-md   # rows: results/students.csv
    python benchmarks/students.py --quick       # 1 seed, 12 steps, 512 held-out positions

Sized for a quiet 2-core CPU (estimated from the measured ~264-300 positions/s of such students, not
measured on a quiet machine): --quick about 4 minutes, the default (3 seeds x 7 runs x 40 steps)
about 30. On a shared machine everything stretches with the load; the wall time and load averages
are recorded with every CSV row.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import PROVENANCE, ResultsFile, csv_argument, machine_load, provenance, pyplot, save_figure
from kd_common import (bytes_per_position, command_line, corpus_plan, heldout_windows, load_cached_teacher,
                       markdown_table, update_results_md)
from torch.utils.data import DataLoader

from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig, CorpusConfig, SparsifyConfig, StoreConfig, TeacherConfig
from logitcache.train.dataset import CacheDataset
from logitcache.train.losses import full_kd_loss, kd_loss
from logitcache.train.metrics import calibration_bins, expected_calibration_error, kl_per_position
from logitcache.store.commit import read_manifest
from logitcache.store.reader import iter_sequences, spec_from_manifest
from logitcache.train.loop import make_student

BINS = 15
COLUMNS = PROVENANCE + ("wall_s", "load", "layers", "steps", "batch", "seq_len", "lr", "eval_positions", "quick",
                        "method", "seed", "loss_kind", "bytes_per_position", "ids_per_position", "ce", "kl",
                        "top1_agreement", "accuracy", "ece", "ece_vs_teacher", "train_seconds", "train_tokens_per_s",
                        "gap_closed_ce", "gap_closed_kl")


@dataclass(frozen=True)
class Run:
    name: str
    store: str  # key of the store that supplies tokens (and targets)
    kind: str  # kd_loss kind, or "full" / "ce"


def runs(hybrid: tuple[int, int]) -> list[Run]:
    k, n = hybrid
    return [Run("CE only", "topk12", "ce"), Run("full KD (online)", "topk12", "full"),
            Run("top-12 renorm", "topk12", "topk_renorm"), Run("top-50 renorm", "topk50", "topk_renorm"),
            Run("top-12 + ghost", "topk12", "ghost"), Run("RS-KD N=50", "rs50", "sparse"),
            Run(f"hybrid k={k} N={n}", "hybrid", "sparse")]


def capture_stores(teacher, work: Path, seed: int, args) -> dict[str, Path]:
    """The stores one seed needs (top-k stores do not depend on the seed and are shared)."""
    k, n = args.hybrid
    specs = {"topk12": (SparsifyConfig(method="topk", k=12), 0), "topk50": (SparsifyConfig(method="topk", k=50), 0),
             "rs50": (SparsifyConfig(method="sample", samples=50), seed),
             "hybrid": (SparsifyConfig(method="hybrid", k=k, samples=n), seed)}
    out = {}
    for key, (sparsify, capture_seed) in specs.items():
        path = work / f"{key}-seed{capture_seed}"
        if not (path / "manifest.json").exists():
            config = CaptureConfig(teacher=TeacherConfig(device="cpu", dtype="bfloat16"),
                                   corpus=CorpusConfig(seq_len=args.seq_len, max_tokens=args.train_tokens),
                                   sparsify=sparsify, store=StoreConfig(path=str(path)), seed=capture_seed)
            capture(config, overwrite=True, progress=False, teacher=teacher)
        out[key] = path
    return out


def store_size(path: Path) -> tuple[float, float]:
    """``(bytes/position, ids/position)`` of a store, re-encoded with the store's encoder."""
    spec = spec_from_manifest(read_manifest(path).header)
    seq_ids, tokens, targets = zip(*iter_sequences(path))
    ids = sum(float(t.ids_per_position().sum()) for t in targets) / sum(t.num_positions for t in targets)
    return bytes_per_position(spec, list(seq_ids), list(tokens), list(targets)), ids


def make_frozen_head_student(layers: int):
    model = make_student(f"init:embedded:smollm2-135m-instruct:{layers}")
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the output head
    model.train()
    return model


def train_student(run: Run, store: Path, teacher, seed: int, args,
                  build: Callable[[], torch.nn.Module] | None = None) -> tuple[torch.nn.Module, dict]:
    """Train one student (``build()``, by default the frozen-head cut teacher, made after seeding torch
    with ``seed``); returns it and ``{"order": sha of the seq ids seen, "seconds", "tokens"}``."""
    torch.manual_seed(seed)
    model = build() if build is not None else make_frozen_head_student(args.layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    ds = CacheDataset(store, shuffle=True, seed=seed, batch_size=args.batch)
    order, step, tokens, started = hashlib.sha256(), 0, 0, time.perf_counter()
    while step < args.steps:
        for batch in DataLoader(ds, batch_size=args.batch, collate_fn=ds.collate):
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            if run.kind == "full":
                loss = full_kd_loss(logits, teacher.logits(batch["input_ids"]))
            elif run.kind == "ce":
                loss = kd_loss(logits, batch, alpha=0.0)
            else:
                loss = kd_loss(logits, batch, alpha=1.0, kind=run.kind)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            order.update(batch["seq_ids"].numpy().tobytes())
            step, tokens = step + 1, tokens + batch["input_ids"].numel()
            if step == args.steps:
                break
        ds.set_epoch(ds.epoch + 1)
    model.eval()
    return model, {"order": order.hexdigest(), "seconds": time.perf_counter() - started, "tokens": tokens}


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, teacher_logits: torch.Tensor, batch: int = 4) -> dict:
    """Per-position arrays on the held-out windows: ``ce``, ``kl``, ``conf``, ``correct``, ``agree``."""
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in ("ce", "kl", "conf", "correct", "agree")}
    for s in range(0, windows.shape[0], batch):
        w = windows[s:s + batch]
        z = model(input_ids=w[:, :-1], use_cache=False).logits.float()
        v = z.shape[-1]
        z, labels, t = z.reshape(-1, v), w[:, 1:].reshape(-1), teacher_logits[s:s + batch].reshape(-1, v)
        logp = torch.log_softmax(z, -1)
        conf, pred = logp.max(-1)
        parts["ce"].append(-logp.gather(1, labels[:, None])[:, 0])
        parts["kl"].append(kl_per_position(t, z))
        parts["conf"].append(conf.exp())
        parts["correct"].append(pred == labels)
        parts["agree"].append(pred == t.argmax(-1))
    return {key: torch.cat(value) for key, value in parts.items()}


def summarise(per_pos: dict) -> dict[str, float]:
    return {"ce": float(per_pos["ce"].mean()), "kl": float(per_pos["kl"].mean()),
            "top1_agreement": float(per_pos["agree"].float().mean()),
            "accuracy": float(per_pos["correct"].float().mean()),
            "ece": expected_calibration_error(per_pos["conf"], per_pos["correct"], BINS),
            "ece_vs_teacher": expected_calibration_error(per_pos["conf"], per_pos["agree"], BINS)}


def teacher_reference(windows: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    v = teacher_logits.shape[-1]
    logp = torch.log_softmax(teacher_logits.reshape(-1, v).float(), -1)
    labels = windows[:, 1:].reshape(-1)
    conf, pred = logp.max(-1)
    correct = pred == labels
    return {"ce": float(-logp.gather(1, labels[:, None]).mean()), "accuracy": float(correct.float().mean()),
            "ece": expected_calibration_error(conf.exp(), correct, BINS), "conf": conf.exp(), "correct": correct}


def gap_closed(value: float, ce_only: float, full: float) -> float:
    """Fraction of the CE-only → full-KD difference closed (1 = as full KD, 0 = as CE only)."""
    return (ce_only - value) / (ce_only - full) if ce_only != full else float("nan")


def run_all(args, work: Path) -> tuple[list[dict], dict, dict]:
    started = time.perf_counter()
    teacher = load_cached_teacher()
    plan = corpus_plan(teacher, args.seq_len)
    held = heldout_windows(plan, args.eval_windows)
    train_windows = -(-args.train_tokens // args.seq_len)
    if train_windows > held.start:
        raise SystemExit(f"{train_windows} training windows would overlap the {args.eval_windows} held-out ones "
                         f"(the corpus has {plan.num_windows} windows of {args.seq_len}); lower --steps or --batch")
    windows = torch.from_numpy(plan.windows(held.start, held.stop)).long()
    teacher_logits = teacher.logits(windows[:, :-1])
    reference = teacher_reference(windows, teacher_logits)
    rows, pooled = [], {}
    for seed in args.seeds:
        stores = capture_stores(teacher, work, seed, args)
        sizes = {key: store_size(path) for key, path in stores.items()}
        orders = set()
        for run in runs(args.hybrid):
            model, info = train_student(run, stores[run.store], teacher, seed, args)
            orders.add(info["order"])
            per_pos = evaluate(model, windows, teacher_logits)
            for key in ("conf", "correct", "agree"):
                pooled.setdefault(run.name, {}).setdefault(key, []).append(per_pos[key])
            online = run.kind in ("ce", "full")
            nbytes, ids = (float("nan"), float("nan")) if online else sizes[run.store]
            row = {"method": run.name, "seed": seed, "loss_kind": run.kind, "bytes_per_position": round(nbytes, 2),
                   "ids_per_position": round(ids, 2), **{k: round(v, 5) for k, v in summarise(per_pos).items()},
                   "train_seconds": round(info["seconds"], 1),
                   "train_tokens_per_s": round(info["tokens"] / info["seconds"], 1)}
            rows.append(row)
            print(f"seed {seed} {run.name:>20}: ce {row['ce']:.4f} kl {row['kl']:.4f} top1 {row['top1_agreement']:.4f} "
                  f"ece {row['ece']:.4f} [{info['seconds']:.0f} s, {row['train_tokens_per_s']:.0f} tok/s]", flush=True)
        if len(orders) != 1:
            raise RuntimeError(f"seed {seed}: the runs saw {len(orders)} different data orders; expected one")
    for seed in args.seeds:
        by = {r["method"]: r for r in rows if r["seed"] == seed}
        ce, full = by["CE only"], by["full KD (online)"]
        for r in by.values():
            r["gap_closed_ce"] = round(gap_closed(r["ce"], ce["ce"], full["ce"]), 4)
            r["gap_closed_kl"] = round(gap_closed(r["kl"], ce["kl"], full["kl"]), 4)
    meta = {**provenance(), "wall_s": round(time.perf_counter() - started, 1), "load": machine_load(),
            "layers": args.layers, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
            "eval_positions": args.eval_windows * args.seq_len, "quick": args.quick}
    pooled = {name: {key: torch.cat(v) for key, v in parts.items()} for name, parts in pooled.items()}
    return [{**meta, **r} for r in rows], pooled, reference


def mean_sd(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def aggregate(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == name]
        out.append({"method": name, "bytes": sel[0]["bytes_per_position"], "ids": sel[0]["ids_per_position"],
                    **{key: [r[key] for r in sel] for key in ("ce", "kl", "top1_agreement", "ece", "ece_vs_teacher",
                                                               "gap_closed_ce", "gap_closed_kl")}})
    return out


def results_section(rows: list[dict], reference: dict, command: str) -> str:
    r0 = rows[0]
    seeds = sorted({r["seed"] for r in rows})
    head = ["method", "bytes/pos", "ids/pos", "held-out CE", "KL(t‖p)", "top-1 agree", "ECE (next token)",
            "ECE (vs teacher top-1)", "gap closed (CE)", "gap closed (KL)"]
    body = []
    for a in aggregate(rows):
        size = ("—", "—") if a["bytes"] != a["bytes"] else (a["bytes"], a["ids"])
        body.append([a["method"], *size, mean_sd(a["ce"], 4), mean_sd(a["kl"], 4), mean_sd(a["top1_agreement"], 4),
                     mean_sd([100 * x for x in a["ece"]], 2) + " %", mean_sd([100 * x for x in a["ece_vs_teacher"]], 2) + " %",
                     mean_sd(a["gap_closed_ce"], 2), mean_sd(a["gap_closed_kl"], 2)])
    body.append(["teacher (reference)", "—", "—", f"{reference['ce']:.4f}", "0", "1", f"{100 * reference['ece']:.2f} %",
                 "—", "—", "—"])
    return (f"Command: `{command}`\n\n"
            f"Student: teacher cut to {r0['layers']} of 30 layers, embeddings/head frozen; {r0['steps']} steps × "
            f"{r0['batch']} windows × {r0['seq_len']} tokens, AdamW lr {r0['lr']}; held-out {r0['eval_positions']} "
            f"positions; seeds {seeds} (mean ± sd over seeds). Run {r0['timestamp']}, commit {r0['commit']}, "
            f"{r0['machine']}, torch {r0['torch']}; **wall {r0['wall_s']} s** at load {r0['load']} "
            f"(1/5/15-min averages at the end).\n\n" + markdown_table(head, body))


def plot_gap(rows: list[dict], prefix: Path) -> Path:
    plt = pyplot()
    agg = [a for a in aggregate(rows) if a["bytes"] == a["bytes"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "gap_closed_ce", "held-out CE"), (axes[1], "gap_closed_kl", "KL(teacher ‖ student)")):
        for a in agg:
            vals = a[key]
            err = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.errorbar(a["bytes"], statistics.mean(vals), yerr=err, fmt="o", capsize=3, label=a["method"])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.axhline(0.0, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("bytes / position (store encoder)")
        ax.set_ylabel(f"fraction of CE→full-KD gap closed ({label})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Students: storage vs gap closed (1 = full KD, 0 = CE only)")
    return save_figure(fig, prefix.with_name(prefix.name + "_gap.png"))


def plot_reliability(pooled: dict, reference: dict, prefix: Path) -> Path:
    plt = pyplot()
    panels = list(pooled.items()) + [("teacher", {"conf": [reference["conf"]], "correct": [reference["correct"]]})]
    cols = 4
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(3.2 * cols, 3.2 * -(-len(panels) // cols)))
    centers = (np.arange(BINS) + 0.5) / BINS
    for ax, (name, parts) in zip(axes.flat, panels):
        conf = parts["conf"] if isinstance(parts["conf"], torch.Tensor) else torch.cat(parts["conf"])
        correct = parts["correct"] if isinstance(parts["correct"], torch.Tensor) else torch.cat(parts["correct"])
        table = calibration_bins(conf, correct, BINS)
        acc = np.nan_to_num(table["accuracy"].numpy())
        ax.bar(centers, acc, width=1 / BINS, edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ece = expected_calibration_error(conf, correct, BINS)
        ax.set_title(f"{name}\nECE {100 * ece:.2f} %", fontsize=9)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Reliability: {BINS} equal-width bins, top-1 vs next token (held-out, seeds pooled)")
    return save_figure(fig, prefix.with_name(prefix.name + "_reliability.png"), dpi=100)


def summarize(args) -> None:
    """Table and gap PNG from CSV rows written by earlier invocations (e.g. one per seed)."""
    import csv

    with open(args.summarize, newline="") as f:
        rows = [r for r in csv.DictReader(f) if (r["quick"] == "True") == args.quick]
    if not rows:
        raise SystemExit(f"{args.summarize} holds no rows with quick={args.quick}")
    latest = {(r["method"], r["seed"]): r for r in rows}
    numeric = ("bytes_per_position", "ids_per_position", "ce", "kl", "top1_agreement", "accuracy", "ece",
               "ece_vs_teacher", "gap_closed_ce", "gap_closed_kl", "wall_s")
    rows = [{**r, **{k: float(r[k]) for k in numeric}, "seed": int(r["seed"])} for r in latest.values()]
    reference = {"ce": args.teacher_ce if args.teacher_ce is not None else float("nan"),
                 "ece": args.teacher_ece if args.teacher_ece is not None else float("nan")}
    command = command_line()
    commits = sorted({r["commit"] for r in rows})
    walls = ", ".join(f"seed {r['seed']}: {r['wall_s']:.0f} s at load {r['load']}" for r in rows if r["method"] == "CE only")
    section = results_section(rows, reference, command).replace(
        f"Run {rows[0]['timestamp']}, commit {rows[0]['commit']}",
        f"Rows of {len({r['seed'] for r in rows})} invocations (commits {', '.join(commits)})").replace(
        f"**wall {rows[0]['wall_s']} s** at load {rows[0]['load']} (1/5/15-min averages at the end)",
        f"wall per invocation: {walls}")
    if args.results_md:
        update_results_md("students-quick" if args.quick else "students", section)
    if args.png:
        plot_gap(rows, args.png)
    print(section)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 12 steps, 4 held-out windows")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept from the teacher's 30")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--hybrid", type=lambda s: tuple(int(x) for x in s.split(",")), default=(2, 20),
                    help="K,N of the hybrid run (chosen to match RS-KD N=50 in bytes)")
    ap.add_argument("--work", type=Path, default=None, help="directory for the stores (default: a temporary one)")
    csv_argument(ap, "students.csv")
    ap.add_argument("--png", type=Path, default=None, help="prefix: writes <prefix>_gap.png and <prefix>_reliability.png")
    ap.add_argument("--results-md", action="store_true", help="replace the students table in docs/results.md")
    ap.add_argument("--summarize", type=Path, default=None,
                    help="no training: rebuild the table (mean ± sd over seeds) and the gap PNG from the rows of "
                         "this CSV (quick or not as --quick says; the last row per method and seed wins)")
    ap.add_argument("--teacher-ce", type=float, default=None, help="with --summarize: the teacher's held-out CE")
    ap.add_argument("--teacher-ece", type=float, default=None, help="with --summarize: the teacher's ECE")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.summarize:
        summarize(args)
        return
    out = ResultsFile(args.csv, COLUMNS)
    if args.quick:
        args.seeds, args.steps, args.eval_windows = args.seeds[:1], 12, 4
    args.train_tokens = args.steps * args.batch * args.seq_len
    work = args.work or Path(tempfile.mkdtemp(prefix="logitcache-students-"))
    try:
        rows, pooled, reference = run_all(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    out.append(rows)
    if args.png:
        plot_gap(rows, args.png)
        plot_reliability(pooled, reference, args.png)
    if args.results_md:
        update_results_md("students-quick" if args.quick else "students",
                          results_section(rows, reference, command_line()))
    print(f"wall {rows[0]['wall_s']} s, load {rows[0]['load']}")


if __name__ == "__main__":
    main()
