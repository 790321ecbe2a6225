"""One-process capture: plan → teach → sparsify → write, exactly once per unit, resumable.

Each unit of work (``sequences_per_shard`` consecutive sequences: windows of a packed plan, documents or
conversations of a documents plan) becomes one shard. Sequences are batched for the teacher by a token
budget, but everything that reaches the store depends only on (sequence, seed, seq_id): the teacher
applies its head per sequence (and computes a documents sequence in a shape set by its length alone,
:func:`~logitcache.capture.teachers.base.bucket_length`), and random draws come from
:func:`logitcache.capture.sparsify.draw_uniforms` per sequence. So batch size, restarts and worker count
never change a byte. A documents sequence is sparsified at its trained positions only.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from .. import __version__
from .config import CaptureConfig
from .chat import read_chat_template
from .corpus import Corpus, open_corpus
from .documents import DocumentPlan, Sequence, build_document_plan
from .generate import GenerationPlan, build_generation_plan, generate_unit
from ..errors import ConfigError, StoreError
from ..faults import fault_point
from ..store.manifest import Manifest, ManifestHeader, PlanSection, ShardRecord, StoreSection, TokenizerSection
from ..models.tokenizers import tokenizer_fingerprint, tokenizer_fingerprints
from .plan import Plan, PlanSlice, Unit, build_plan, plan_units
from .limits import check_teacher_limits, plan_warnings
from .budget import DrawnChunk, sequence_targets
from .sparsify import draw_uniforms, label_logprobs, sparsify
from ..store.commit import MANIFEST, begin_store, finalize_store, mismatch_error, read_manifest
from ..store.encoding import DEFAULT_ID_CODEC, Encoding, corpus_order
from ..store.fs import StoreFS
from ..store.spec import ShardSpec, spec_from_manifest
from ..store.containers import get_container
from ..store.lock import StoreLock
from ..store.writer import encode_and_commit
from ..targets import SparseTargets
from .teachers import Teacher, load_teacher
from .teachers.base import bucket_length
from .teachers.hf import resolve_device

AnyPlan = Plan | PlanSlice | DocumentPlan | GenerationPlan  # a whole plan, or the slice of one unit a Ray worker has


@dataclass(frozen=True)
class CaptureSummary:
    """What a capture run did (``tokens`` counts positions captured by this run only)."""

    store: str
    units_total: int
    units_skipped: int
    units_written: int
    tokens: int
    seconds: float
    manifest: Manifest

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def head_size(config: CaptureConfig, vocab_size: int) -> int:
    method = config.sparsify.method
    if method == "full":
        return vocab_size
    return min(config.sparsify.k, vocab_size) if method in ("topk", "hybrid") else 0


def store_encoding(config: CaptureConfig, vocab_size: int, tokens) -> Encoding:
    """The row encoding for this capture; ``rank-delta`` ranks ids by their frequency in ``tokens``."""
    ids = DEFAULT_ID_CODEC if config.store.ids == "auto" else config.store.ids
    order = corpus_order(tokens, vocab_size) if ids == "rank-delta" else ()
    return Encoding(ids=ids, logprobs=config.store.logprob_dtype, vocab_size=vocab_size, order=order,
                    entropy=config.store.entropy, label_logprobs=config.store.label_logprobs,
                    sample_totals=config.sparsify.allocation != "fixed")


def build_header(config: CaptureConfig, teacher: Teacher, plan: Plan | DocumentPlan, units: list[Unit],
                 corpus: Corpus) -> ManifestHeader:
    """The manifest header: everything a reader needs, and what a resume must match (``corpus`` just read
    into ``plan``: its canonical source and what its reader found go in the corpus section; a documents
    plan adds ``corpus.layout``)."""
    store = config.store
    documents = isinstance(plan, (DocumentPlan, GenerationPlan))
    corpus_section = {"source": corpus.source, "fingerprint": plan.corpus_fingerprint}
    if documents:  # before the stats it changes, so a resume with other settings names the setting
        corpus_section["layout"] = plan.layout.to_dict()
    corpus_section.update(stats=plan.stats, input=corpus.manifest_input())
    return ManifestHeader(
        layout="documents" if documents else None,
        identity=config.identity(),
        method=config.sparsify.method,
        params=config.sparsify.params(),
        head_size=head_size(config, teacher.vocab_size),
        seed=config.seed,
        teacher=teacher.identity(),
        tokenizer=TokenizerSection(tokenizer_fingerprint(teacher.tokenizer), int(teacher.eos_id)),
        corpus=corpus_section,
        seq_len=plan.seq_len,
        plan=PlanSection(sequences=plan.num_sequences, positions=plan.positions, shards=len(units),
                         sequences_per_shard=store.sequences_per_shard),
        store=StoreSection(store.format, store.compression, store.compression_level,
                           store_encoding(config, teacher.vocab_size, plan.tokens)),
        written_by=f"logitcache {__version__}",
    )


def sparsify_batch(teacher: Teacher, windows: torch.Tensor, seq_ids: list[int],
                   config: CaptureConfig) -> list[SparseTargets]:
    """Targets for a batch of windows ``int64[B, L+1]``: one SparseTargets of L positions each."""
    inputs, labels = windows[:, :-1], windows[:, 1:]
    num_positions = inputs.shape[1]
    cfg = config.sparsify
    draws = cfg.max_samples if cfg.method in ("sample", "hybrid") else 0
    uniforms = [draw_uniforms(config.seed, s, num_positions, draws) if draws else None for s in seq_ids]
    parts: list[list[SparseTargets]] = [[] for _ in seq_ids]
    for row, start, logits in teacher.forward_chunks(inputs, config.teacher.head_chunk):
        u = uniforms[row]
        chunk_u = None if u is None else u[start:start + logits.shape[0]].to(logits.device)
        parts[row].append(_sparsify(logits, config, chunk_u, labels[row, start:start + logits.shape[0]]))
        fault_point("teacher_chunk")
    return [sequence_targets(p, cfg.samples) for p in parts]


def sparsify_sequences(teacher: Teacher, sequences: list[Sequence], seq_ids: list[int],
                       config: CaptureConfig) -> list[SparseTargets]:
    """Targets of documents sequences at their trained positions only: one compact SparseTargets of
    ``mask.sum()`` positions each (in position order). The teacher reads each whole sequence but its last
    token, alone (:meth:`Teacher.forward_sequences`); the draws of a sequence are indexed by trained position."""
    cfg = config.sparsify
    draws = cfg.max_samples if cfg.method in ("sample", "hybrid") else 0
    masks = [torch.from_numpy(np.array(s.mask, dtype=bool)) for s in sequences]  # a copy: plan arrays are read-only
    uniforms = [draw_uniforms(config.seed, i, int(m.sum()), draws) if draws else None for i, m in zip(seq_ids, masks)]
    inputs = [torch.from_numpy(np.asarray(s.tokens[:-1], dtype=np.int64)) for s in sequences]
    parts: list[list[SparseTargets]] = [[] for _ in sequences]
    done = [0] * len(sequences)  # trained positions sparsified so far, per sequence (its chunks come in order)
    for row, start, logits in teacher.forward_sequences(inputs, config.teacher.head_chunk):
        trained = masks[row][start:start + logits.shape[0]]
        count = int(trained.sum())
        if count:
            u = uniforms[row]
            chunk_u = None if u is None else u[done[row]:done[row] + count].to(logits.device)
            labels = torch.from_numpy(np.array(sequences[row].tokens[start + 1:start + 1 + trained.numel()], np.int64))
            parts[row].append(_sparsify(logits[trained.to(logits.device)], config, chunk_u, labels[trained]))
            done[row] += count
        fault_point("teacher_chunk")
    return [sequence_targets(p, cfg.samples) for p in parts]


def _sparsify(logits: torch.Tensor, config: CaptureConfig, uniforms: torch.Tensor | None,
              labels: torch.Tensor) -> SparseTargets | DrawnChunk:
    """Targets of ``logits`` (rows predicting ``labels``), computed where the logits are (the teacher's device).
    With ``store.label_logprobs`` they carry each label's exact log-probability too
    (:func:`~logitcache.capture.sparsify.label_logprobs`). Fixed-budget targets stay there: the writer computes
    their streams on that device (:mod:`logitcache.store.encode_device`); the CPU packs the bytes. An
    adaptive budget's chunks come to the CPU, where :func:`sequence_targets` allocates the sequence's draws."""
    targets = sparsify(logits, config.sparsify, uniforms)
    if config.store.label_logprobs:
        targets = replace(targets, label_logprobs=label_logprobs(logits, labels))
    return targets if isinstance(targets, SparseTargets) else targets.to("cpu")


def sequence_batches(lengths: list[int], batch_tokens: int, max_positions: int) -> list[list[int]]:
    """Indices of sequences of ``lengths`` positions, shortest first, cut into batches whose padded
    positions (:func:`bucket_length` each) stay within ``batch_tokens`` (at least one sequence a batch)."""
    batches: list[list[int]] = []
    used = batch_tokens
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        padded = bucket_length(lengths[i], max_positions)
        if used + padded > batch_tokens:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += padded
    return batches


def compute_unit(teacher: Teacher, plan: AnyPlan, unit: Unit, config: CaptureConfig,
                 on_batch: Callable[[int], None] = lambda n: None
                 ) -> tuple[list[int], list, list[SparseTargets], list | None, list[int] | None]:
    """The teacher's part of a unit: ``(seq_ids, tokens, targets, masks, finish)`` of its sequences (``masks``:
    the documents plan's per-position masks, None for packed windows; ``finish``: the finish codes of
    generated responses, else None); ``on_batch`` gets the positions done."""
    fault_point("unit_start")
    if isinstance(plan, DocumentPlan):
        idx = range(unit.start, unit.stop)
        sequences, seq_ids = [plan.sequence(i) for i in idx], [plan.seq_id(i) for i in idx]
        return (*_compute_sequences(teacher, sequences, seq_ids, config, on_batch), None)
    if isinstance(plan, GenerationPlan):  # generate the responses, then capture them as documents sequences
        done = generate_unit(teacher, plan, unit, config)
        return (*_compute_sequences(teacher, done.sequences, done.seq_ids, config, on_batch), done.finish)
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
    return seq_ids, tokens, targets, None, None


def _compute_sequences(teacher: Teacher, sequences: list[Sequence], seq_ids: list[int], config: CaptureConfig,
                       on_batch: Callable[[int], None]) -> tuple[list[int], list, list[SparseTargets], list]:
    targets: list[SparseTargets | None] = [None] * len(sequences)
    lengths = [s.tokens.size - 1 for s in sequences]
    for batch in sequence_batches(lengths, config.batch_tokens, teacher.max_positions):
        done = sparsify_sequences(teacher, [sequences[i] for i in batch], [seq_ids[i] for i in batch], config)
        for i, t in zip(batch, done):
            targets[i] = t
        on_batch(sum(t.num_positions for t in done))
    return seq_ids, [s.tokens for s in sequences], targets, [s.mask for s in sequences]


def capture_and_commit(teacher: Teacher, plan: AnyPlan, unit: Unit, config: CaptureConfig, spec: ShardSpec,
                       root: str, on_batch: Callable[[int], None] = lambda n: None) -> ShardRecord:
    """The one place a unit is computed and committed, in-process and in Ray workers alike
    (``root`` is the store's path or URL)."""
    return encode_and_commit(spec, unit.index, *compute_unit(teacher, plan, unit, config, on_batch), root=root)


def encode_threads(config: CaptureConfig) -> int:
    """``config.encode_threads``, or for 0 (auto) 1 beside a CPU teacher (the teacher wants the cores)
    and up to 4 beside a GPU teacher (encoding is then the slow side; 4 beat 1, 2 and 8 on an H100 with
    16 cores, where more threads fight over the GIL: docs/benchmarks.md, "GPU")."""
    if config.encode_threads:
        return config.encode_threads
    if resolve_device(config.teacher.device).type == "cpu":
        return 1
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def capture_pipelined(teacher: Teacher, plan: AnyPlan, units: list[Unit], config: CaptureConfig, spec: ShardSpec,
                      root: str, on_batch: Callable[[int], None] = lambda n: None) -> Iterator[ShardRecord]:
    """In-process capture of ``units``: this thread runs the teacher while a pool encodes and commits
    finished units (numpy and zstd release the GIL). At most ``threads`` units wait to be encoded, so
    memory stays bounded. Every unit still goes through :func:`encode_and_commit`; a crash leaves
    committed units and nothing else, exactly as the sequential loop would."""
    threads = encode_threads(config)
    with ThreadPoolExecutor(threads, thread_name_prefix="logitcache-encode") as pool:
        pending: deque[Future] = deque()
        try:
            for unit in units:
                work = compute_unit(teacher, plan, unit, config, on_batch)
                pending.append(pool.submit(encode_and_commit, spec, unit.index, *work, root=root))
                while len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # on an error, units not yet started are dropped; running ones finish their commit
            for future in pending:
                future.cancel()


def prepare_capture(config: CaptureConfig, teacher: Teacher, corpus: Corpus | None = None
                    ) -> tuple[Plan | DocumentPlan, list[Unit], ManifestHeader, ShardSpec]:
    """Plan, units, manifest header and shard spec: a pure function of the config and the teacher
    (``corpus``: the config's corpus, already opened)."""
    c = config.corpus
    check_teacher_limits(config, teacher.vocab_size)
    corpus = corpus or open_corpus(c.source, text_field=c.text_field, split=c.split)
    plan = make_plan(config, teacher, corpus)
    plan_warnings(config, plan)
    units = plan_units(plan, config.store.sequences_per_shard)
    header = build_header(config, teacher, plan, units, corpus)
    return plan, units, header, spec_from_manifest(header)


def resolved_layout(config: CaptureConfig, corpus: Corpus) -> str:
    """``packed`` or ``documents``: the config's layout, ``auto`` resolved by the kind of corpus."""
    layout = config.corpus.layout
    if layout == "auto":
        return "documents" if corpus.chat else "packed"
    if layout == "packed" and corpus.chat:
        raise ConfigError(f"{corpus.source} holds conversations, which the packed layout cannot express (it joins "
                          "documents into one stream and trains every position); use --layout documents (or auto)")
    return layout


def make_plan(config: CaptureConfig, teacher: Teacher, corpus: Corpus) -> Plan | DocumentPlan:
    """The packed or documents plan of ``corpus`` (see :func:`resolved_layout`)."""
    c = config.corpus
    if not config.generate.enabled and resolved_layout(config, corpus) == "packed":
        return build_plan(corpus.documents(), teacher.tokenizer, seq_len=c.seq_len, max_tokens=c.max_tokens,
                          eos_id=teacher.eos_id, max_positions=teacher.max_positions)
    if c.seq_len > teacher.max_positions:
        raise ConfigError(f"seq_len = {c.seq_len} exceeds the teacher's max_positions = {teacher.max_positions}; "
                          f"lower --seq-len to at most {teacher.max_positions}")
    template = None if c.chat_template is None else read_chat_template(c.chat_template)
    if config.generate.enabled:
        return build_generation_plan(corpus, teacher.tokenizer, seq_len=c.seq_len, max_tokens=c.max_tokens,
                                     settings=config.generate, chat_template=template, stop_ids=(int(teacher.eos_id),))
    return build_document_plan(corpus, teacher.tokenizer, seq_len=c.seq_len, max_tokens=c.max_tokens,
                               eos_id=teacher.eos_id, long_sequences=c.long_sequences, train_on=c.train_on,
                               chat_template=template)


def preflight(config: CaptureConfig, *, overwrite: bool) -> Corpus:
    """What can be checked before a teacher loads (which takes minutes for a large one): the store location
    (a directory or URL, and an existing store's identity unless ``overwrite``), then the corpus, opened and
    read through (:meth:`Corpus.check`). Returns the opened corpus; raises what the capture would raise later."""
    fs = StoreFS(config.store.path)
    if not fs.remote:
        _check_store_directory(fs.root, config.store.path)
    if not overwrite and fs.exists(MANIFEST):
        diff = read_manifest(fs).header.identity_difference(config.identity())
        if diff:
            raise mismatch_error(fs.url, diff)
    c = config.corpus
    corpus = open_corpus(c.source, text_field=c.text_field, split=c.split)
    corpus.check()
    return corpus


def _check_store_directory(root, given: str) -> None:
    """Refuse a local store path that is, or lies under, a file (mkdir would fail with a bare errno)."""
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                raise StoreError(f"--out {given!r}: {path} is a file, not a directory; a store is a directory "
                                 "(new or existing) or a URL. Choose another --out, or move the file away")
            return


# execute(plan, spec, root URL, units, on_positions) -> the committed ShardRecords, in any order
Executor = Callable[[Plan | DocumentPlan, ShardSpec, str, list[Unit], Callable[[int], None]], Iterable[ShardRecord]]


def run_capture(config: CaptureConfig, teacher: Teacher, execute: Executor, *, overwrite: bool,
                progress: bool, corpus: Corpus | None = None) -> CaptureSummary:
    """Plan, open the store, hand the units not yet committed to ``execute``, finalise the manifest."""
    plan, units, header, spec = prepare_capture(config, teacher, corpus)
    fs = StoreFS(config.store.path)
    started = time.perf_counter()
    with StoreLock(fs):
        header, spec = _resumed_header(fs, header, spec, overwrite, tokenizer_fingerprints(teacher.tokenizer))
        committed = begin_store(fs, header, get_container(spec.format).static_objects(spec), overwrite=overwrite)
        done = {r.index for r in committed}
        todo = [u for u in units if u.index not in done]
        records = list(committed)
        bar = _progress_bar(progress, total=plan.positions,
                            initial=sum(r.positions for r in committed))
        fresh = list(execute(plan, spec, fs.url, todo, bar.update))
        bar.close()
        if sorted(r.index for r in fresh) != [u.index for u in todo]:
            raise RuntimeError(f"capture executor returned units {sorted(r.index for r in fresh)}; "
                               f"expected {[u.index for u in todo]}")
        fault_point("before_finalize")
        manifest = finalize_store(fs, header, records + fresh)
    return CaptureSummary(store=fs.url, units_total=len(units), units_skipped=len(units) - len(todo),
                          units_written=len(todo), tokens=sum(r.positions for r in fresh),
                          seconds=time.perf_counter() - started, manifest=manifest)


def _resumed_header(fs: StoreFS, header: ManifestHeader, spec: ShardSpec, overwrite: bool,
                    fingerprints: tuple[str, ...]) -> tuple[ManifestHeader, ShardSpec]:
    """The store's own header and spec when this run resumes it and they differ in display-only fields alone
    (committed units stay bound to it: the store ends as an uninterrupted run leaves it), else this run's; the
    store's form of the tokenizer fingerprint, if one of ``fingerprints``, is kept."""
    if overwrite or not fs.exists(MANIFEST):
        return header, spec
    existing = read_manifest(fs).header
    recorded = existing.tokenizer.fingerprint
    if recorded != header.tokenizer.fingerprint and recorded in fingerprints:
        header = replace(header, tokenizer=replace(header.tokenizer, fingerprint=recorded))
        spec = spec_from_manifest(header)
    if not existing.same_but_for_display(header):
        return header, spec
    return existing, spec_from_manifest(existing)


def capture_local(config: CaptureConfig, *, overwrite: bool = False, progress: bool = True,
                  teacher: Teacher | None = None) -> CaptureSummary:
    """Capture ``config`` in this process (``teacher`` or the one the config names); resumes an
    interrupted store with the same configuration. :func:`logitcache.capture.capture` chooses between
    this and the Ray job. The store location and the corpus are checked before the teacher loads."""
    corpus = preflight(config, overwrite=overwrite)
    teacher = teacher or load_teacher(config.teacher)

    def execute(plan, spec, root, todo, on_positions):
        return capture_pipelined(teacher, plan, todo, config, spec, root, on_batch=on_positions)

    return run_capture(config, teacher, execute, overwrite=overwrite, progress=progress, corpus=corpus)


def _progress_bar(enabled: bool, *, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="capture",
                disable=not enabled, smoothing=0.1, dynamic_ncols=True)
