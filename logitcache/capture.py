"""One-process capture: plan → teach → sparsify → write, exactly once per unit, resumable.

Each unit of work (``sequences_per_shard`` consecutive windows) becomes one shard. Windows are
batched for the teacher by a token budget, but everything that reaches the store depends only
on (window, seed, seq_id): the teacher applies its head per sequence, and random draws come
from :func:`logitcache.sparsify.draw_uniforms` per sequence. So batch size, restarts and
worker count never change a byte.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Callable

import torch

from . import __version__
from .config import CaptureConfig
from .corpus import read_documents
from .faults import fault_point
from .plan import Plan, Unit, build_plan, plan_units, tokenizer_fingerprint
from .sparsify import draw_uniforms, sparsify
from .store.arrow import EXTENSION, ShardSpec, encode_shard
from .store.layout import FORMAT_NAME, FORMAT_VERSION, ShardRecord, StoreLock, begin_store, commit_unit, \
    finalize_store, shard_name
from .store.reader import spec_from_manifest
from .targets import SparseTargets, concat_targets
from .teachers import Teacher, load_teacher


@dataclass(frozen=True)
class CaptureSummary:
    """What a capture run did (``tokens`` counts positions captured by this run only)."""

    store: str
    units_total: int
    units_skipped: int
    units_written: int
    tokens: int
    seconds: float
    manifest: dict[str, Any]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def head_size(config: CaptureConfig, vocab_size: int) -> int:
    method = config.sparsify.method
    if method == "full":
        return vocab_size
    return min(config.sparsify.k, vocab_size) if method in ("topk", "hybrid") else 0


def build_header(config: CaptureConfig, teacher: Teacher, plan: Plan, units: list[Unit]) -> dict[str, Any]:
    """The manifest header: everything a reader needs, and what a resume must match."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "identity": config.identity(),
        "method": config.sparsify.method,
        "params": config.sparsify.params(),
        "head_size": head_size(config, teacher.vocab_size),
        "seed": config.seed,
        "teacher": teacher.identity(),
        "tokenizer": {"fingerprint": tokenizer_fingerprint(teacher.tokenizer), "eos_id": int(teacher.eos_id)},
        "corpus": {"source": config.corpus.source, "fingerprint": plan.corpus_fingerprint, "stats": plan.stats},
        "seq_len": plan.seq_len,
        "plan": {"sequences": plan.num_windows, "positions": plan.num_windows * plan.seq_len,
                 "shards": len(units), "sequences_per_shard": config.store.sequences_per_shard},
        "store": {"format": config.store.format, "compression": config.store.compression,
                  "logprob_dtype": config.store.logprob_dtype},
        "written_by": f"logitcache {__version__}",
    }


def sparsify_batch(teacher: Teacher, windows: torch.Tensor, seq_ids: list[int],
                   config: CaptureConfig) -> list[SparseTargets]:
    """Targets for a batch of windows ``int64[B, L+1]``: one SparseTargets of L positions each."""
    inputs = windows[:, :-1]
    num_positions = inputs.shape[1]
    cfg = config.sparsify
    draws = cfg.samples if cfg.method in ("sample", "hybrid") else 0
    uniforms = [draw_uniforms(config.seed, s, num_positions, draws) if draws else None for s in seq_ids]
    parts: list[list[SparseTargets]] = [[] for _ in seq_ids]
    for row, start, logits in teacher.forward_chunks(inputs, config.teacher.head_chunk):
        u = uniforms[row]
        chunk_u = None if u is None else u[start:start + logits.shape[0]]
        parts[row].append(sparsify(logits, cfg, chunk_u))
    return [concat_targets(p) for p in parts]


def capture_unit(teacher: Teacher, plan: Plan, unit: Unit, config: CaptureConfig,
                 spec: ShardSpec, on_batch: Callable[[int], None] = lambda n: None) -> tuple[ShardRecord, bytes]:
    """Run the teacher over one unit's windows and encode them as one shard."""
    per_batch = max(1, config.batch_tokens // (plan.seq_len + 1))
    seq_ids, tokens, targets = [], [], []
    for start in range(unit.start, unit.stop, per_batch):
        idx = range(start, min(start + per_batch, unit.stop))
        windows = plan.windows(idx.start, idx.stop)
        ids = [plan.seq_id(i) for i in idx]
        batch_targets = sparsify_batch(teacher, torch.from_numpy(windows).long(), ids, config)
        seq_ids += ids
        tokens += list(windows)
        targets += batch_targets
        on_batch(len(idx) * plan.seq_len)
    data = encode_shard(spec, seq_ids, tokens, targets)
    record = ShardRecord(
        index=unit.index,
        path=shard_name(unit.index, EXTENSION),
        sequences=len(seq_ids),
        positions=sum(t.num_positions for t in targets),
        entries=int(sum(int(t.ids_per_position().sum()) for t in targets)),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return record, data


def capture_and_commit(teacher: Teacher, plan: Plan, unit: Unit, config: CaptureConfig, spec: ShardSpec,
                       root: Path, on_batch: Callable[[int], None] = lambda n: None) -> ShardRecord:
    """The one place a unit is computed and committed, in-process and in Ray workers alike."""
    fault_point("unit_start")
    record, data = capture_unit(teacher, plan, unit, config, spec, on_batch=on_batch)
    commit_unit(root, record, data)
    fault_point("after_commit")
    return record


def prepare_capture(config: CaptureConfig, teacher: Teacher) -> tuple[Plan, list[Unit], dict[str, Any], ShardSpec]:
    """Plan, units, manifest header and shard spec: a pure function of the config and the teacher."""
    corpus = config.corpus
    documents = read_documents(corpus.source, text_field=corpus.text_field, split=corpus.split)
    plan = build_plan(documents, teacher.tokenizer, seq_len=corpus.seq_len, max_tokens=corpus.max_tokens,
                      eos_id=teacher.eos_id, max_positions=teacher.max_positions)
    units = plan_units(plan, config.store.sequences_per_shard)
    header = build_header(config, teacher, plan, units)
    return plan, units, header, spec_from_manifest(dict(header, shards=[]))


# execute(plan, spec, root, units, on_positions) -> the committed ShardRecords, in any order
Executor = Callable[[Plan, ShardSpec, Path, list[Unit], Callable[[int], None]], Iterable[ShardRecord]]


def run_capture(config: CaptureConfig, teacher: Teacher, execute: Executor, *, overwrite: bool,
                progress: bool) -> CaptureSummary:
    """Plan, open the store, hand the units not yet committed to ``execute``, finalise the manifest."""
    plan, units, header, spec = prepare_capture(config, teacher)
    root = Path(config.store.path)
    started = time.perf_counter()
    with StoreLock(root):
        committed = begin_store(root, header, overwrite=overwrite)
        done = {r.index for r in committed}
        todo = [u for u in units if u.index not in done]
        records = list(committed)
        bar = _progress_bar(progress, total=plan.num_windows * plan.seq_len,
                            initial=sum(r.positions for r in committed))
        fresh = list(execute(plan, spec, root, todo, bar.update))
        bar.close()
        if sorted(r.index for r in fresh) != [u.index for u in todo]:
            raise RuntimeError(f"capture executor returned units {sorted(r.index for r in fresh)}; "
                               f"expected {[u.index for u in todo]}")
        fault_point("before_finalize")
        manifest = finalize_store(root, header, records + fresh)
    return CaptureSummary(store=str(root), units_total=len(units), units_skipped=len(units) - len(todo),
                          units_written=len(todo), tokens=sum(r.positions for r in fresh),
                          seconds=time.perf_counter() - started, manifest=manifest)


def capture(config: CaptureConfig, *, overwrite: bool = False, progress: bool = True,
            teacher: Teacher | None = None) -> CaptureSummary:
    """Capture sparse targets for ``config``; resumes an interrupted store with the same configuration.

    With ``config.workers`` >= 1 (and no ``teacher`` given) the units run on that many Ray actors.
    """
    if config.workers and teacher is None:
        from .distributed import capture_distributed

        return capture_distributed(config, overwrite=overwrite, progress=progress)
    teacher = teacher or load_teacher(config.teacher)

    def execute(plan, spec, root, todo, on_positions):
        for unit in todo:
            yield capture_and_commit(teacher, plan, unit, config, spec, root, on_batch=on_positions)

    return run_capture(config, teacher, execute, overwrite=overwrite, progress=progress)


def _progress_bar(enabled: bool, *, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="capture",
                disable=not enabled, smoothing=0.1, dynamic_ncols=True)
