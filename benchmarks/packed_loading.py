"""Loader throughput and waste of token-budget packing (``CacheDataset(pack_tokens=N)``) against padded
batches, on a documents store with pydoc-chat's sequence lengths.

The store is written with the store API: ``--sequences`` sequences drawn (with replacement) from
``builtin:pydoc-chat`` rendered by the embedded SmolLM2 tokenizer at seq_len 2048 (median ~440 tokens,
15 of 79 conversations truncated at 2049), each with its real train mask; tokens are taken mod the store
vocabulary (97) and the targets are random top-``k`` at the trained positions (the loader decodes ``k``
entries per trained position; the vocabulary size does not enter). Cases, through ``DataLoader``
(``num_workers=0``, one thread), interleaved over ``--repeats`` rounds (median reported):

* ``padded``: ``batch_size`` sequences per batch, padded to the longest (``ds.collate``);
* ``packed-batch``: the same ``batch_size`` sequences in one padding-free row (``ds.collate_packed``);
* ``budget``: rows of at most ``--pack-tokens`` input positions (``pack_tokens``, ``batch_size=None``).

``tokens`` are the sequences' input positions a case delivers; ``cells`` what the batches hold
(``B · T_max`` padded, the row widths packed); ``padding_fraction = 1 − tokens / cells``;
``unused_budget = 1 − tokens / (rows · pack_tokens)``. ``rank_tokens_min/max``: input positions per rank
over one epoch with ``--world-size`` ranks (equal sequence counts for the per-sequence cases; the deal of
packed_order for ``budget``).

    python benchmarks/packed_loading.py      # appends to benchmarks/results/packed_loading.csv
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from common import PROVENANCE, ResultsFile, csv_argument, interleave, provenance, single_thread, timed
from torch.utils.data import DataLoader

from logitcache.store import read_manifest
from logitcache.store.commit import begin_store, commit_unit, finalize_store
from logitcache.store.containers import get_container
from logitcache.store.fs import StoreFS
from logitcache.store.spec import spec_from_manifest
from logitcache.store.writer import encode_unit
from logitcache.targets import SparseTargets
from logitcache.testing.store_conformance import VOCAB, make_header
from logitcache.train.dataset import CacheDataset
from logitcache.train.world import World

COLUMNS = PROVENANCE + ("threads", "case", "sequences", "batch_size", "pack_tokens", "rows", "tokens", "cells",
                        "padding_fraction", "unused_budget", "seconds", "tokens_per_s", "world_size",
                        "rank_tokens_min", "rank_tokens_max")
SEQ_LEN = 2048


def pydoc_chat_sequences() -> list[tuple[np.ndarray, np.ndarray]]:
    """``(tokens, mask)`` of every builtin:pydoc-chat conversation, rendered by the embedded teacher's tokenizer."""
    from transformers import AutoTokenizer

    from logitcache.capture.corpus import open_corpus
    from logitcache.capture.documents import build_document_plan
    from logitcache.models.embedded import resolve_teacher_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_teacher_path("embedded:smollm2-135m-instruct"))
    plan = build_document_plan(open_corpus("builtin:pydoc-chat"), tokenizer, seq_len=SEQ_LEN, max_tokens=None,
                               eos_id=tokenizer.eos_token_id, long_sequences="truncate", train_on="assistant",
                               chat_template=None)
    return [(s.tokens, s.mask) for s in map(plan.sequence, range(plan.num_sequences))]


def random_topk(positions: int, k: int, rng: np.random.Generator) -> SparseTargets:
    """Top-``k`` targets: distinct ids, log-probabilities descending, the rest of the mass in the tail."""
    ids = np.argsort(rng.random((positions, VOCAB)), axis=1)[:, :k]
    probs = -np.sort(-rng.dirichlet(np.ones(k + 1), positions), axis=1)
    return SparseTargets("topk", head_ids=torch.from_numpy(ids.astype(np.int32)),
                         head_logprobs=torch.from_numpy(np.log(probs[:, :k]).astype(np.float32)),
                         tail_mass=torch.from_numpy(probs[:, k].astype(np.float32)))


def make_store(path: Path, sequences: int, k: int, per_shard: int, seed: int) -> None:
    source, rng = pydoc_chat_sequences(), np.random.default_rng(seed)
    header = make_header("topk", "arrow", sequences=sequences, per_shard=per_shard, k=k, seq_len=SEQ_LEN)
    header = dataclasses.replace(header, layout="documents")
    fs, spec = StoreFS(path), spec_from_manifest(header)
    begin_store(fs, header, get_container(spec.format).static_objects(spec), overwrite=False)
    picks, records = rng.integers(0, len(source), sequences), []
    for index in range(-(-sequences // per_shard)):
        part = [source[int(i)] for i in picks[index * per_shard:(index + 1) * per_shard]]
        tokens = [(t % VOCAB).astype(np.int32) for t, _ in part]
        targets = [random_topk(int(m.sum()), k, rng) for _, m in part]
        seq_ids = list(range(index * per_shard, index * per_shard + len(part)))
        record, objects = encode_unit(spec, index, seq_ids, tokens, targets, [m for _, m in part])
        commit_unit(fs, record, objects)
        records.append(record)
    finalize_store(fs, header, records)


def read(store: Path, case: str, batch_size: int, budget: int) -> dict[str, int]:
    """One epoch of ``case``: tokens delivered, cells held, rows (batches)."""
    if case == "budget":
        ds = CacheDataset(store, shuffle=True, seed=0, pack_tokens=budget)
        loader = DataLoader(ds, batch_size=None)
    else:
        ds = CacheDataset(store, shuffle=True, seed=0, batch_size=batch_size)
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate if case == "padded" else ds.collate_packed)
    tokens = cells = rows = 0
    for batch in loader:
        real = batch["attention_mask"].sum() if case == "padded" else batch["input_ids"].shape[1]
        tokens, cells, rows = tokens + int(real), cells + batch["input_ids"].numel(), rows + 1
    return {"tokens": tokens, "cells": cells, "rows": rows}


def rank_tokens(store: Path, case: str, batch_size: int, budget: int, world_size: int) -> list[int]:
    """Input positions each rank reads in one epoch (from the plans alone: no shard is read)."""
    over = {"pack_tokens": budget} if case == "budget" else {"batch_size": batch_size}
    sizes = np.asarray([n - 1 for record in read_manifest(store).shards for n in record.lengths])
    return [int(sizes[CacheDataset(store, shuffle=True, seed=0, world=World(rank, world_size), **over).indices()].sum())
            for rank in range(world_size)]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=600)
    ap.add_argument("--k", type=int, default=16, help="top-k entries per trained position")
    ap.add_argument("--sequences-per-shard", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pack-tokens", type=int, default=8192)
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    csv_argument(ap, "packed_loading.csv")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = ResultsFile(args.csv, COLUMNS)
    single_thread()
    cases = ("padded", "packed-batch", "budget")
    workdir = Path(tempfile.mkdtemp(prefix="lc-packed-bench-"))
    try:
        store = workdir / "store"
        started = time.perf_counter()
        make_store(store, args.sequences, args.k, args.sequences_per_shard, seed=0)
        print(f"store of {args.sequences} sequences written in {time.perf_counter() - started:.1f} s", flush=True)
        counts = {case: read(store, case, args.batch_size, args.pack_tokens) for case in cases}  # warm-up too
        times = interleave({case: partial(timed, read, store, case, args.batch_size, args.pack_tokens)
                            for case in cases}, args.repeats, warmup=False)
        balance = {case: rank_tokens(store, case, args.batch_size, args.pack_tokens, args.world_size) for case in cases}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for case in cases:
        c, seconds = counts[case], statistics.median(times[case])
        budget = args.pack_tokens if case == "budget" else ""
        rows.append({**provenance(), "threads": 1, "case": case, "sequences": args.sequences,
                     "batch_size": "" if case == "budget" else args.batch_size, "pack_tokens": budget,
                     "rows": c["rows"], "tokens": c["tokens"], "cells": c["cells"],
                     "padding_fraction": round(1 - c["tokens"] / c["cells"], 4),
                     "unused_budget": round(1 - c["tokens"] / (c["rows"] * args.pack_tokens), 4) if budget else "",
                     "seconds": round(seconds, 4), "tokens_per_s": round(c["tokens"] / seconds, 1),
                     "world_size": args.world_size, "rank_tokens_min": min(balance[case]),
                     "rank_tokens_max": max(balance[case])})
        print(" ".join(f"{k}={v}" for k, v in rows[-1].items() if k not in PROVENANCE), flush=True)
    out.append(rows)


if __name__ == "__main__":
    main()
