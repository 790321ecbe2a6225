"""The realized-token log-probability column and cross-tokenizer training from it (issue #16), on the embedded
teacher (SmolLM2-135M-Instruct, bf16, CPU) over ``builtin:pydoc`` windows of 512; one metric per CSV row
(benchmarks/results/xtok_label_logprobs.csv):

* ``bytes``: RS-KD N = 50 and top-64 captures of the same ``--tokens`` positions, with and without
  ``--label-logprobs``: shard bytes per position, and what the column adds; the capture's seconds (single
  runs, on a shared machine: not a speed comparison);
* ``loader``: the RS-KD store with the column through a ``DataLoader`` (batch 4, one thread, interleaved over
  ``--repeats`` rounds, median): the ordinary ``collate`` against ``CrossTokenizerTransform.collate`` to the
  Unigram-1k student tokenizer (:func:`logitcache.testing.tokenizers.make_unigram_tokenizer`): teacher
  positions per second;
* ``student``: two tiny Llama students with the Unigram-1k vocabulary, the same initialisation, batches and
  steps: ``ce`` (the student's own next tokens only, ``alpha = 0``) and ``xtok-kd`` (``alpha = 0.5``,
  exact-match KL + ULD from the RS-KD store, merges by the chain rule from the column), evaluated on
  ``--heldout`` later windows of the corpus: CE in the student's tokens, and the exact-match KL to the
  teacher's top-256 (a top-256 capture of the same windows) on aligned positions.

    python benchmarks/xtok_label_logprobs.py      # ~5 min on 2 shared CPU cores (captures on one thread)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from common import PROVENANCE, ResultsFile, csv_argument, interleave, machine_load, print_row, provenance, \
    single_thread, timed
from torch.utils.data import DataLoader

from logitcache.capture.config import CaptureConfig
from logitcache.capture.pipeline import capture_local
from logitcache.capture.teachers import load_teacher
from logitcache.models.tokenizers import tokenizer_fingerprint
from logitcache.store import inspect_store
from logitcache.testing.tokenizers import make_unigram_tokenizer
from logitcache.train.cross_tokenizer import CrossTokenizerTransform
from logitcache.train.dataset import CacheDataset, CacheView
from logitcache.train.losses_xtok import cross_tokenizer_kd_loss, cross_tokenizer_terms

TEACHER, SEQ_LEN = "embedded:smollm2-135m-instruct", 512
METHODS = {"sample-50": {"sparsify.method": "sample", "sparsify.samples": 50},
           "topk-64": {"sparsify.method": "topk", "sparsify.k": 64},
           "topk-256": {"sparsify.method": "topk", "sparsify.k": 256}}
COLUMNS = PROVENANCE + ("load", "measurement", "case", "metric", "value")


def config(out: Path, method: str, labels: bool, tokens: int) -> CaptureConfig:
    return CaptureConfig().with_overrides({"teacher.model": TEACHER, "corpus.source": "builtin:pydoc",
                                           "corpus.seq_len": SEQ_LEN, "corpus.max_tokens": tokens,
                                           "store.path": str(out), "store.label_logprobs": labels, **METHODS[method]})


def measure_bytes(teacher, root: Path, tokens: int, rows: list) -> None:
    for method in ("sample-50", "topk-64"):
        per = {}
        for labels in (False, True):
            out = root / f"{method}-{labels}"
            summary = capture_local(config(out, method, labels, tokens), progress=False, teacher=teacher)
            per[labels] = inspect_store(out)["bytes_per_position"]
            case = f"{method}{' +label_logprobs' if labels else ''}"
            rows += [("bytes", case, "bytes_per_position", round(per[labels], 3)),
                     ("bytes", case, "capture_seconds", round(summary.seconds, 2))]
        rows.append(("bytes", method, "label_logprob_bytes_per_position", round(per[True] - per[False], 3)))


def measure_loader(store: Path, transform: CrossTokenizerTransform, fingerprint: str, repeats: int, rows: list) -> None:
    ds = CacheDataset(str(store), tokenizer_fingerprint=fingerprint)
    positions = inspect_store(store)["positions"]

    def one_pass(collate) -> None:
        for _ in DataLoader(ds, batch_size=4, collate_fn=collate):
            pass

    seconds = interleave({"off": partial(timed, one_pass, ds.collate),
                          "on": partial(timed, one_pass, transform.collate)}, repeats)
    for case, values in seconds.items():
        rows.append(("loader", f"alignment {case}", "teacher_positions_per_s",
                     round(positions / statistics.median(values))))


def student(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048))


def evaluate(model, batches: list[dict]) -> tuple[float, float]:
    """Held-out ``(CE in the student's tokens, exact-match KL on aligned positions)``, means over the batches."""
    with torch.no_grad():
        terms = [cross_tokenizer_terms(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b)
                 for b in batches]
    return statistics.fmean(float(t.ce) for t in terms), statistics.fmean(float(t.exact) for t in terms)


def fit(model, train: list[dict], order: list[int], steps: int, alpha: float) -> float:
    """``steps`` Adam steps of ``cross_tokenizer_kd_loss`` over ``train[order[step % len(order)]]``; seconds taken."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    started = time.perf_counter()
    for step in range(steps):
        b = train[order[step % len(order)]]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = cross_tokenizer_kd_loss(logits, b, alpha=alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - started


def student_batches(transform: CrossTokenizerTransform, view: CacheView, ref: CacheView) -> tuple[list, list]:
    """Training batches (pairs of the store's rows) and held-out batches (the reference's rows past the store's),
    in the student's tokens."""
    train = [transform.collate([view[i], view[i + 1]]) for i in range(0, len(view) - 1, 2)]
    return train, [transform.collate([ref[i]]) for i in range(len(view), len(ref))]


def write_rows(meta: dict, rows: list[tuple], csv: Path) -> None:
    out = [{**meta, **dict(zip(COLUMNS[len(PROVENANCE) + 1:], r))} for r in rows]
    for row in out:
        print_row(row)
    ResultsFile(csv, COLUMNS).append(out)


def measure_students(train: list[dict], heldout: list[dict], vocab: int, steps: int, rows: list) -> None:
    for case, alpha in (("ce", 0.0), ("xtok-kd", 0.5)):
        model = student(vocab)
        before = evaluate(model, heldout)
        seconds = fit(model, train, list(range(len(train))), steps, alpha)
        ce, kl = evaluate(model, heldout)
        rows += [("student", case, "heldout_ce_before", round(before[0], 4)),
                 ("student", case, "heldout_kl_aligned_before", round(before[1], 4)),
                 ("student", case, "heldout_ce", round(ce, 4)), ("student", case, "heldout_kl_aligned", round(kl, 4)),
                 ("student", case, "train_seconds", round(seconds, 1)), ("student", case, "steps", steps)]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="positions per store (whole windows of 512)")
    ap.add_argument("--heldout", type=int, default=4, help="held-out windows after the training ones")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=160)
    csv_argument(ap, "xtok_label_logprobs.csv")
    return ap


def main() -> None:
    args = parser().parse_args()
    single_thread()
    meta = {**provenance(), "load": machine_load()}
    root = Path(tempfile.mkdtemp(prefix="xtok_labels_"))
    rows: list[tuple] = []
    try:
        teacher = load_teacher(config(root / "x", "sample-50", True, args.tokens).teacher)
        measure_bytes(teacher, root, args.tokens, rows)
        reference = root / "topk-256"
        capture_local(config(reference, "topk-256", True, args.tokens + args.heldout * SEQ_LEN), progress=False,
                      teacher=teacher)
        fingerprint = tokenizer_fingerprint(teacher.tokenizer)
        transform = CrossTokenizerTransform(teacher.tokenizer, make_unigram_tokenizer(), store=str(reference))
        store = root / "sample-50-True"
        measure_loader(store, transform, fingerprint, args.repeats, rows)
        view, ref = CacheView(str(store), tokenizer_fingerprint=fingerprint), CacheView(str(reference),
                                                                                       tokenizer_fingerprint=fingerprint)
        assert all(torch.equal(view[i]["input_ids"], ref[i]["input_ids"]) for i in range(len(view)))  # same windows
        train, heldout = student_batches(transform, view, ref)
        measure_students(train, heldout, len(transform.student_bytes), args.steps, rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_rows(meta, rows, args.csv)


if __name__ == "__main__":
    main()
