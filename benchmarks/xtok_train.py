"""Cross-tokenizer training from a store (issue #16), on the embedded teacher (SmolLM2-135M-Instruct, bf16, CPU)
over ``builtin:pydoc`` windows of 512, to the Unigram-1k student tokenizer
(:func:`logitcache.testing.tokenizers.make_unigram_tokenizer`); one metric per CSV row
(benchmarks/results/xtok_train.csv):

* ``loader``: an RS-KD N = 50 store with ``--label-logprobs`` through a ``DataLoader`` (batch 4, one thread,
  interleaved over ``--repeats`` rounds, median): the ordinary ``collate`` against
  ``CrossTokenizerTransform.collate``, teacher positions per second; then ``profile``: the cProfile top
  entries (own time) of the transform over one pass, share of the pass each;
* ``student``: tiny Llama students with the Unigram-1k vocabulary over ``--seeds`` seeds (initialisation and
  batch order): ``ce`` (``alpha = 0``) and ``xtok-kd`` (``alpha = 0.5``, exact-match KL + ULD, chain-rule
  merges from the column), the same batches and steps per seed; held-out CE in the student's tokens and the
  exact-match KL to the teacher's top-256 on aligned positions (a top-256 capture of ``--heldout`` later
  windows), mean and sample sd over the seeds.

    python benchmarks/xtok_train.py      # ~4 min on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import shutil
import statistics
import tempfile
from pathlib import Path

from common import csv_argument, machine_load, provenance, single_thread
from xtok_label_logprobs import COLUMNS  # noqa: F401  (the CSV header: rows are written by write_rows)
from xtok_label_logprobs import SEQ_LEN, config, evaluate, fit, measure_loader, student, student_batches, write_rows

from logitcache.capture.pipeline import capture_local
from logitcache.capture.teachers import load_teacher
from logitcache.testing.tokenizers import make_unigram_tokenizer
from logitcache.train.cross_tokenizer import CrossTokenizerTransform
from logitcache.train.dataset import CacheDataset, CacheView



def profile_transform(store: Path, transform: CrossTokenizerTransform, top: int, rows: list) -> None:
    ds = CacheDataset(str(store), tokenizer_fingerprint=transform.teacher_fingerprint)
    items = list(ds)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(0, len(items), 4):
        transform.collate(items[i:i + 4])
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(entry[2] for entry in stats.stats.values())  # own time of every function
    ranked = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (file, line, name), entry in ranked:
        rows.append(("profile", f"{Path(file).name}:{line}({name})", "own_time_share", round(entry[2] / total, 3)))


def train_student(case: str, alpha: float, seed: int, train: list[dict], heldout: list[dict], vocab: int,
                  steps: int, rows: list) -> None:
    model = student(vocab, seed)
    seconds = fit(model, train, random.Random(seed).sample(range(len(train)), len(train)), steps, alpha)
    ce, kl = evaluate(model, heldout)
    rows += [("student", f"{case} seed {seed}", "heldout_ce", round(ce, 4)),
             ("student", f"{case} seed {seed}", "heldout_kl_aligned", round(kl, 4)),
             ("student", f"{case} seed {seed}", "train_seconds", round(seconds, 1))]


def summarise(rows: list) -> None:
    for case in ("ce", "xtok-kd"):
        for metric in ("heldout_ce", "heldout_kl_aligned"):
            values = [r[3] for r in rows if r[0] == "student" and r[1].startswith(f"{case} seed") and r[2] == metric]
            rows += [("student", case, f"{metric}_mean", round(statistics.fmean(values), 4)),
                     ("student", case, f"{metric}_sd", round(statistics.stdev(values), 4))]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="training positions (whole windows of 512)")
    ap.add_argument("--heldout", type=int, default=2, help="held-out windows after the training ones")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--top", type=int, default=8, help="profile entries")
    csv_argument(ap, "xtok_train.csv")
    return ap


def main() -> None:
    args = parser().parse_args()
    single_thread()
    meta = {**provenance(), "load": machine_load()}
    root = Path(tempfile.mkdtemp(prefix="xtok_train_"))
    rows: list[tuple] = []
    try:
        store, reference = root / "sample-50", root / "topk-256"
        teacher = load_teacher(config(store, "sample-50", True, args.tokens).teacher)
        capture_local(config(store, "sample-50", True, args.tokens), progress=False, teacher=teacher)
        capture_local(config(reference, "topk-256", True, args.tokens + args.heldout * SEQ_LEN), progress=False,
                      teacher=teacher)
        transform = CrossTokenizerTransform(teacher.tokenizer, make_unigram_tokenizer(), store=str(store))
        del teacher
        measure_loader(store, transform, transform.teacher_fingerprint, args.repeats, rows)
        profile_transform(store, transform, args.top, rows)
        view = CacheView(str(store), tokenizer_fingerprint=transform.teacher_fingerprint)
        ref = CacheView(str(reference), tokenizer_fingerprint=transform.teacher_fingerprint)
        train, heldout = student_batches(transform, view, ref)
        for seed in range(args.seeds):
            for case, alpha in (("ce", 0.0), ("xtok-kd", 0.5)):
                train_student(case, alpha, seed, train, heldout, len(transform.student_bytes), args.steps, rows)
        summarise(rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_rows(meta, rows, args.csv)


if __name__ == "__main__":
    main()
