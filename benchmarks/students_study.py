"""The student study: random-init students distilled per target method at two or three byte budgets,
on the Python standard library, with enough seeds to say which differences are real.

Teacher: SmolLM2-135M-Instruct (bf16), its decoder run ONCE per window and the hidden states kept
on disk under ``--work`` (``kd_common.CachedBodyTeacher``), so a second run (or a resumed one)
skips the body; its head runs once per window per invocation and the logits stay in memory
(~50 MB a window), shared by every capture and the online full-KD reference.
Corpus: ``--corpus`` (default ``builtin:stdlib``); students train on its first ``--train-windows``
windows for ``--epochs`` epochs, and are evaluated on its last ``--eval-windows`` windows.

Student: a random-init Llama with the teacher's tokenizer and vocabulary (``--d-model``,
``--layers``, tied embedding/head; the init depends on the seed), AdamW at constant ``--lr``.
Methods at each budget (k and N in :data:`BUDGETS`, chosen from measured store sizes): top-k
renormalised, top-k + ghost, RS-KD N, RS-KD with the adaptive budget (``allocation="variance"``, a
smaller mean N for the same bytes), hybrid (k, N) and its adaptive variant; plus CE only and full KD
(the teacher's head online on the cached hidden states). The seed changes the init, the data order
and the RS draws (each sampled store is captured per seed). Training and metrics are ``students.py``'s.

A pair of methods is "separable" when its difference of seed means is at least twice the larger of
the two seed standard deviations.

    python benchmarks/students_study.py --quick --work /tmp/study   # 1 budget (~50 B), 2 seeds, 16 windows
    python benchmarks/students_study.py --work /tmp/study --png docs/img/students_study.png   # 3 budgets, 3 seeds
    python benchmarks/students_study.py --summarize benchmarks/results/students_study.csv --png ...  # no training

Runtimes (single torch thread, 2-core VM): the --quick pilot took 907 s at load 3.3-3.8 before the
head's logits were kept (full KD then cost 120 s a run; 61 s with them), so about 10 minutes loaded
and less quiet; the full run (60 students of 32 windows x 3 epochs, 39 stores) is estimated at
50-60 minutes from the pilots' rates (~1300 positions/s per student, 60 s per 24k-position full-KD
run, 3 s per capture after the first), not yet measured. Memory: ~50 MB of logits a window.
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import PROVENANCE, ResultsFile, csv_argument, machine_load, provenance, pyplot, save_figure, single_thread
from kd_common import command_line, corpus_plan, heldout_windows, load_cached_teacher, markdown_table, update_results_md
from students import (Run, evaluate, gap_closed, mean_sd, plot_reliability, store_size, summarise, teacher_reference,
                      train_student)

from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig, CorpusConfig, SparsifyConfig, StoreConfig, TeacherConfig
from logitcache.capture.corpus import open_corpus
from logitcache.store import read_manifest

COLUMNS = PROVENANCE + ("wall_s", "load", "corpus", "python", "files_sha256", "student", "train_windows", "epochs",
                        "steps", "batch", "seq_len", "lr", "eval_positions", "quick", "budget", "method", "seed",
                        "loss_kind", "bytes_per_position", "ids_per_position", "ce", "kl", "top1_agreement",
                        "accuracy", "ece", "ece_vs_teacher", "train_seconds", "train_tokens_per_s",
                        "gap_closed_ce", "gap_closed_kl", "teacher_ce", "teacher_ece")


@dataclass(frozen=True)
class Budget:
    """One byte budget: the top-k ``k``, RS-KD ``samples`` and hybrid ``(k, samples)`` that store about
    ``name`` bytes per position on the study corpus, and the smaller draw counts the adaptive budget
    needs for the same bytes (it spreads draws to flat positions, where they add more distinct ids)."""

    name: str
    topk: int
    samples: int
    samples_adaptive: int
    hybrid: tuple[int, int]
    hybrid_adaptive: tuple[int, int]


BUDGETS = {"25": Budget("~25 B", 6, 60, 48, (1, 24), (1, 20)), "50": Budget("~50 B", 12, 170, 135, (3, 30), (3, 27)),
           "100": Budget("~100 B", 26, 450, 360, (6, 64), (6, 56))}  # pilot: hybrid (10, 110) stored 147 B


def _methods(budget: Budget) -> list[tuple[Run, SparsifyConfig]]:
    k, n, na, (hk, hn), (ak, an) = (budget.topk, budget.samples, budget.samples_adaptive, budget.hybrid,
                                    budget.hybrid_adaptive)
    topk = SparsifyConfig(method="topk", k=k)
    return [(Run(f"top-{k} renorm", f"topk{k}", "topk_renorm"), topk),
            (Run(f"top-{k} + ghost", f"topk{k}", "ghost"), topk),
            (Run(f"RS-KD N={n}", f"rs{n}", "sparse"), SparsifyConfig(method="sample", samples=n)),
            (Run(f"RS-KD N={na} adaptive", f"rs{na}-var", "sparse"),
             SparsifyConfig(method="sample", samples=na, allocation="variance")),
            (Run(f"hybrid k={hk} N={hn}", f"hy{hk}-{hn}", "sparse"), SparsifyConfig(method="hybrid", k=hk, samples=hn)),
            (Run(f"hybrid k={ak} N={an} adaptive", f"hy{ak}-{an}-var", "sparse"),
             SparsifyConfig(method="hybrid", k=ak, samples=an, allocation="variance"))]


FAMILIES = ("topk", "ghost", "rs", "rs-adaptive", "hybrid", "hybrid-adaptive")  # --methods; CE and full KD always run


def family(run: Run) -> str:
    """The ``--methods`` name of a cached method's run (``top-12 + ghost`` → ``ghost``)."""
    if run.kind in ("topk_renorm", "ghost"):
        return "topk" if run.kind == "topk_renorm" else "ghost"
    return ("rs" if run.store.startswith("rs") else "hybrid") + ("-adaptive" if run.store.endswith("-var") else "")


def _selected(budget: Budget, families) -> list[tuple[Run, SparsifyConfig]]:
    return [(run, config) for run, config in _methods(budget) if family(run) in families]


def store_configs(budget: Budget, families=FAMILIES) -> dict[str, SparsifyConfig]:
    """Store key → sparsify config of one budget's cached methods (those of ``families``)."""
    return {run.store: config for run, config in _selected(budget, families)}


def budget_runs(budget: Budget, families=FAMILIES) -> list[Run]:
    return [run for run, _ in _selected(budget, families)]


def capture_store(teacher, key: str, sparsify: SparsifyConfig, seed: int, args) -> Path:
    """The store ``key`` of this seed and training windows under ``--work`` (top-k stores are seed-free), captured
    if absent; a store found there must hold this corpus's first ``--train-windows`` windows of ``--seq-len``."""
    capture_seed = 0 if sparsify.method == "topk" else seed
    path = args.work / "stores" / f"{key}-{args.train_windows}x{args.seq_len}-seed{capture_seed}"
    if (path / "manifest.json").exists():
        header = read_manifest(path).header
        found = (header.corpus.get("source"), header.seq_len, header.plan.sequences)
        if found != (args.corpus, args.seq_len, args.train_windows):
            raise SystemExit(f"{path}: holds {found[2]} windows of {found[1]} tokens of {found[0]}; expected "
                             f"{args.train_windows} of {args.seq_len} of {args.corpus}: remove it, or use another --work")
    else:
        config = CaptureConfig(teacher=TeacherConfig(device="cpu", dtype="bfloat16"),
                               corpus=CorpusConfig(source=args.corpus, seq_len=args.seq_len,
                                                   max_tokens=args.train_windows * args.seq_len),
                               sparsify=sparsify, store=StoreConfig(path=str(path)), seed=capture_seed)
        started = time.perf_counter()
        capture(config, overwrite=True, progress=False, teacher=teacher)
        print(f"captured {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def random_student(vocab_size: int, args):
    """A random-init Llama with the teacher's vocabulary (init from torch's current seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, args.d_model // 32)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    return LlamaForCausalLM(config).train()


def heldout(teacher, args) -> torch.Tensor:
    """The last ``--eval-windows`` windows of the corpus (int64[W, L+1]), cached under ``--work``."""
    about = open_corpus(args.corpus).about
    path = args.work / f"heldout-{about.get('files_sha256', 'corpus')[:12]}-{args.seq_len}-{args.eval_windows}.npy"
    if not path.exists():
        plan = corpus_plan(teacher, args.seq_len, args.corpus)
        held = heldout_windows(plan, args.eval_windows)
        if args.train_windows > held.start:
            raise SystemExit(f"{args.train_windows} training windows overlap the {args.eval_windows} held-out ones "
                             f"({plan.num_windows} windows of {args.seq_len}); lower --train-windows")
        np.save(path, plan.windows(held.start, held.stop))
    return torch.from_numpy(np.load(path)).long()


def train_and_evaluate(run: Run, store: Path, teacher, seed: int, args, held: tuple, pooled: dict) -> tuple[dict, str]:
    """One student trained and evaluated: its CSV row and data order; its per-position top-1 confidence and
    correctness are added to ``pooled[method]`` (the reliability diagrams pool the seeds)."""
    windows, teacher_logits = held
    model, info = train_student(run, store, teacher, seed, args, build=lambda: random_student(teacher.vocab_size, args))
    per_pos = evaluate(model, windows, teacher_logits)
    for key in ("conf", "correct"):
        pooled.setdefault(run.name, {"conf": [], "correct": []})[key].append(per_pos[key])
    row = {"method": run.name, "seed": seed, "loss_kind": run.kind,
           **{k: round(v, 5) for k, v in summarise(per_pos).items()},
           "train_seconds": round(info["seconds"], 1), "train_tokens_per_s": round(info["tokens"] / info["seconds"], 1)}
    print(f"seed {seed} {run.name:>28}: ce {row['ce']:.4f} kl {row['kl']:.4f} top1 {row['top1_agreement']:.4f} "
          f"ece {row['ece']:.4f} [{info['seconds']:.0f} s, {row['train_tokens_per_s']:.0f} tok/s]", flush=True)
    return row, info["order"]


def seed_rows(teacher, seed: int, args, held: tuple, pooled: dict) -> list[dict]:
    """Every run of one seed: CE only and full KD once, the cached methods per budget."""
    rows, orders = [], set()
    for b, budget in enumerate(args.budgets):
        configs = {**store_configs(budget, args.methods), f"topk{budget.topk}": SparsifyConfig(method="topk", k=budget.topk)}
        stores = {key: capture_store(teacher, key, cfg, seed, args) for key, cfg in configs.items()}
        online = [Run("CE only", f"topk{budget.topk}", "ce"), Run("full KD (online)", f"topk{budget.topk}", "full")]
        for run in (online if b == 0 else []) + budget_runs(budget, args.methods):
            row, order = train_and_evaluate(run, stores[run.store], teacher, seed, args, held, pooled)
            size = (float("nan"), float("nan")) if run.kind in ("ce", "full") else store_size(stores[run.store])
            rows.append({"budget": "—" if run.kind in ("ce", "full") else budget.name,
                         "bytes_per_position": round(size[0], 2), "ids_per_position": round(size[1], 2), **row})
            orders.add(order)
    if len(orders) != 1:
        raise RuntimeError(f"seed {seed}: the runs saw {len(orders)} different data orders; expected one")
    ce, full = rows[0], rows[1]
    for r in rows:
        r["gap_closed_ce"] = round(gap_closed(r["ce"], ce["ce"], full["ce"]), 4)
        r["gap_closed_kl"] = round(gap_closed(r["kl"], ce["kl"], full["kl"]), 4)
    return rows


def run_all(args) -> tuple[list[dict], dict, dict]:
    """Every seed's rows (with the run's settings and provenance), the pooled per-position calibration data
    per method, and the teacher's reference metrics."""
    started, at_start = time.perf_counter(), provenance()  # the commit and time the run started at
    teacher = load_cached_teacher(cache_dir=args.work / "teacher-body", keep_logits=True)
    windows = heldout(teacher, args)
    train = corpus_plan_head(teacher, args)
    teacher.precompute(np.concatenate([train, windows.numpy()]), label="teacher body (train + held-out)")
    teacher_logits = teacher.logits(windows[:, :-1])
    reference = teacher_reference(windows, teacher_logits)
    pooled: dict = {}
    rows = [r for seed in args.seeds for r in seed_rows(teacher, seed, args, (windows, teacher_logits), pooled)]
    about = open_corpus(args.corpus).about
    meta = {**at_start, "wall_s": round(time.perf_counter() - started, 1), "load": machine_load(),
            "corpus": args.corpus, "python": about.get("python", ""), "files_sha256": about.get("files_sha256", ""),
            "student": f"random-init llama d={args.d_model} layers={args.layers}", "train_windows": args.train_windows,
            "epochs": args.epochs, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
            "eval_positions": args.eval_windows * args.seq_len, "quick": args.quick,
            "teacher_ce": round(reference["ce"], 5), "teacher_ece": round(reference["ece"], 5)}
    return [{**meta, **r} for r in rows], pooled, reference


def corpus_plan_head(teacher, args) -> np.ndarray:
    """The training windows (the first ``--train-windows`` of the corpus), as capture plans them."""
    from logitcache.capture.corpus import read_documents
    from logitcache.capture.plan import build_plan

    plan = build_plan(read_documents(args.corpus), teacher.tokenizer, seq_len=args.seq_len,
                      max_tokens=args.train_windows * args.seq_len, eos_id=teacher.eos_id,
                      max_positions=teacher.max_positions)
    return plan.windows(0, plan.num_windows)


def separability(rows: list[dict], metric: str) -> list[list]:
    """Per budget, every pair of methods (full KD included): difference of seed means, 2 × the larger seed sd and
    the verdict on it (the issue's criterion); then the same difference paired by seed (same init, data order),
    2 × the sd of the per-seed differences and the verdict on that."""
    by = {name: {r["seed"]: r[metric] for r in rows if r["method"] == name}
          for name in dict.fromkeys(r["method"] for r in rows)}
    budgets = dict.fromkeys(r["budget"] for r in rows if r["budget"] != "—")
    out = []
    for budget in budgets:
        names = ["full KD (online)"] + [n for n in by if any(r["budget"] == budget and r["method"] == n for r in rows)]
        for a, b in itertools.combinations(names, 2):
            diff = statistics.mean(by[a].values()) - statistics.mean(by[b].values())
            paired = [by[a][s] - by[b][s] for s in sorted(by[a].keys() & by[b].keys())]
            two_sd, two_sd_paired = ((2 * max(statistics.stdev(by[a].values()), statistics.stdev(by[b].values())),
                                      2 * statistics.stdev(paired)) if len(paired) > 1 else (float("nan"),) * 2)
            out.append([budget, f"{a} − {b}", f"{diff:+.4f}", f"{two_sd:.4f}", _verdict(diff, two_sd),
                        f"{two_sd_paired:.4f}", _verdict(statistics.mean(paired), two_sd_paired)])
    return out


def _verdict(diff: float, two_sd: float) -> str:
    return "separable" if abs(diff) >= two_sd else "not separable at this budget"


def results_section(rows: list[dict], command: str) -> str:
    r0 = rows[0]
    head = ["budget", "method", "bytes/pos", "ids/pos", "held-out CE", "KL(t‖p)", "top-1 agree", "ECE",
            "gap closed (CE)", "gap closed (KL)"]
    body = []
    for name in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == name]
        size = ("—", "—") if sel[0]["kind_online"] else (sel[0]["bytes_per_position"], sel[0]["ids_per_position"])
        body.append([sel[0]["budget"], name, *size,
                     *(mean_sd([r[k] for r in sel], 4) for k in ("ce", "kl", "top1_agreement")),
                     mean_sd([100 * r["ece"] for r in sel], 2) + " %",
                     *(mean_sd([r[k] for r in sel], 2) for k in ("gap_closed_ce", "gap_closed_kl"))])
    body.append(["—", "teacher (reference)", "—", "—", f"{r0['teacher_ce']:.4f}", "0", "1",
                 f"{100 * r0['teacher_ece']:.2f} %", "—", "—"])
    pairs = separability(rows, "kl")
    return (f"Command: `{command}`\n\n"
            f"Corpus {r0['corpus']} (Python {r0['python']}, files sha256 {r0['files_sha256'][:12]}); student "
            f"{r0['student']}, {r0['train_windows']} windows × {r0['seq_len']} tokens × {r0['epochs']} epochs "
            f"({r0['steps']} steps of {r0['batch']}), AdamW lr {r0['lr']}; held-out {r0['eval_positions']} positions; "
            f"seeds {sorted({r['seed'] for r in rows})}. Run {r0['timestamp']}, commit {r0['commit']}, "
            f"{r0['machine']}, torch {r0['torch']}; **wall {r0['wall_s']} s** at load {r0['load']}.\n\n"
            + markdown_table(head, body) + "\n\nSeparable on KL(t‖p): |difference of seed means| ≥ 2 × the larger seed "
            "sd; paired: ≥ 2 × the sd of the per-seed differences (both runs of a seed share init and data order):\n\n"
            + markdown_table(["budget", "pair", "Δ KL", "2 sd", "verdict", "2 sd paired", "paired verdict"], pairs))


def plot_gap(rows: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = {}
    for r in rows:
        if not r["kind_online"]:
            family = re.sub(r"-\d+ ", "-k ", re.sub(r" ?[kN]=\d+", "", r["method"]))  # top-10 → top-k
            families.setdefault(family, {}).setdefault(r["budget"], []).append(r)
    for family, per_budget in families.items():
        points = sorted(per_budget.values(), key=lambda sel: sel[0]["bytes_per_position"])
        xs = [statistics.mean(x["bytes_per_position"] for x in sel) for sel in points]
        ys = [[x["gap_closed_kl"] for x in sel] for sel in points]
        err = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
        ax.errorbar(xs, [statistics.mean(y) for y in ys], yerr=err, fmt="o-", capsize=3, label=family)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axhline(0.0, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("bytes / position (as stored)")
    ax.set_ylabel("fraction of CE→full-KD gap closed on KL(t‖p)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Student study: gap closed vs bytes (mean ± sd over seeds)")
    return save_figure(fig, path)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", 
                    help="the ~50 B budget only, 2 seeds, 16 training windows, 4 held-out")
    ap.add_argument("--corpus", default="builtin:stdlib")
    ap.add_argument("--work", type=Path, default=Path("/tmp/logitcache-students-study"),
                    help="teacher hidden states, held-out windows and stores (kept: reruns reuse them)")
    ap.add_argument("--budgets", nargs="+", choices=sorted(BUDGETS), default=["25", "50", "100"])
    ap.add_argument("--methods", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                    help="the cached methods to train (CE only and full KD always run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-windows", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-windows", type=int, default=8)
    csv_argument(ap, "students_study.csv")
    ap.add_argument("--png", type=Path, default=None,
                    help="write the gap-closed vs bytes figure here, and (after a run) <stem>_reliability.png")
    ap.add_argument("--results-md", action="store_true", help="replace the students-study section of docs/results.md")
    ap.add_argument("--summarize", type=Path, default=None,
                    help="no training: the table and figure from this CSV's rows with the settings of its last row "
                         "(several invocations of one setting merge; the last row per budget, method and seed wins)")
    return ap


SETTINGS = ("corpus", "files_sha256", "student", "train_windows", "epochs", "batch", "seq_len", "lr", "eval_positions")


def read_rows(path: Path) -> list[dict]:
    """The rows of earlier invocations in a CSV that have the settings (:data:`SETTINGS`) of its last row,
    numbers parsed; the last per (budget, method, seed) wins (so invocations of one setting merge, e.g. one per
    seed, and the rows of pilots with other settings are left out)."""
    import csv

    numeric = ("bytes_per_position", "ids_per_position", "ce", "kl", "top1_agreement", "accuracy", "ece",
               "ece_vs_teacher", "gap_closed_ce", "gap_closed_kl", "teacher_ce", "teacher_ece", "wall_s")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path} holds no rows; expected the CSV of an earlier students_study.py run")
    setting = [rows[-1].get(k) for k in SETTINGS]
    latest = {(r["budget"], r["method"], r["seed"]): r for r in rows if [r.get(k) for k in SETTINGS] == setting}
    return [{**r, **{k: float(r[k]) for k in numeric}, "seed": int(r["seed"])} for r in latest.values()]


def main() -> None:
    args = parser().parse_args()
    single_thread()
    if args.quick:
        args.budgets, args.seeds, args.train_windows, args.eval_windows = ["50"], args.seeds[:2], 16, 4
    args.budgets = [BUDGETS[b] for b in args.budgets]
    args.steps = args.epochs * -(-args.train_windows // args.batch)
    out = ResultsFile(args.csv, COLUMNS)
    if args.summarize:
        rows = read_rows(args.summarize)
    else:
        rows, pooled, reference = run_all(args)
        out.append(rows)
        if args.png:  # <png stem>_reliability.png: per method, seeds pooled (needs the run: not in the CSV)
            plot_reliability(pooled, reference, args.png.with_suffix(""))
    shown = [{**r, "kind_online": r["loss_kind"] in ("ce", "full")} for r in rows]
    section = results_section(shown, command_line())
    if args.png:
        plot_gap(shown, args.png)
    if args.results_md:
        update_results_md("students-study-quick" if args.quick else "students-study", section)
    print(section)


if __name__ == "__main__":
    main()
