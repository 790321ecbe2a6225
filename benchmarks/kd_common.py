"""Shared by benchmarks/estimators.py and benchmarks/students.py: the teacher with a body cache,
the held-out split of the corpus, bytes per position from the store's encoder, and the
docs/results.md section writer."""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from logitcache.capture.config import BUILTIN_CORPUS, EMBEDDED_TEACHER, TeacherConfig
from logitcache.capture.corpus import read_documents
from logitcache.capture.plan import Plan, build_plan
from logitcache.capture.teachers.head import head_chunks
from logitcache.store.writer import encode_unit
from logitcache.store.encoding import DEFAULT_ID_CODEC, Encoding, corpus_order
from logitcache.store.spec import ShardSpec
from logitcache.targets import SparseTargets

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "docs" / "results.md"
HEAD_CHUNK = TeacherConfig().head_chunk  # the chunk capture applies the head in


def bytes_per_position(spec: ShardSpec, seq_ids: list[int], tokens: list[np.ndarray],
                       targets: list[SparseTargets]) -> float:
    """Bytes per position of these sequences as one unit written by the store's encoder and Arrow
    container (v2 compact encoding, token column included). For ``rank-delta`` ids the rank order
    comes from these sequences' own tokens, as a capture of just these windows would have it."""
    if spec.encoding.ids == "rank-delta":
        order = corpus_order(np.concatenate([np.asarray(t) for t in tokens]), spec.encoding.vocab_size)
        spec = replace(spec, encoding=replace(spec.encoding, order=order))
    record, _ = encode_unit(replace(spec, sequences_per_shard=len(seq_ids)), 0, seq_ids, tokens, targets)
    return record.bytes / sum(t.num_positions for t in targets)


def shard_spec(method: str, k: int = 0, samples: int = 0, vocab_size: int = 49152) -> ShardSpec:
    """The spec capture writes for a method with the default store settings (``ids=auto``, float32
    logprobs, arrow, zstd-9)."""
    return ShardSpec(method=method, encoding=Encoding(ids=DEFAULT_ID_CODEC, vocab_size=vocab_size),
                     k=k if method in ("topk", "hybrid") else 0,
                     num_samples=samples if method in ("sample", "hybrid") else 0)


class CachedBodyTeacher:
    """An :class:`~logitcache.capture.teachers.hf.HFTeacher` whose decoder runs once per window.

    The body's last hidden states (``[L, d]`` in the teacher's dtype, a few hundred KiB per
    window) are kept per window — in memory, and with ``cache_dir`` also on disk (one file per
    window, named by a digest of the teacher's weights and the window's tokens, written atomically),
    so later runs and a resumed run reuse them. The output head runs on demand; with ``keep_logits``
    its ``[L, V]`` logits are kept in memory too (``L·V·2`` bytes a window in bf16, ~50 MB for
    SmolLM2 at L = 512), so several captures of the same windows and the online full-KD teacher
    cost one head pass per window. Everything else is the wrapped teacher's.
    """

    def __init__(self, teacher, cache_dir: Path | None = None, keep_logits: bool = False) -> None:
        self.inner = teacher
        self.cache_dir = cache_dir
        self.keep_logits = keep_logits
        self._hidden: dict[str, torch.Tensor] = {}
        self._logits: dict[str, torch.Tensor] = {}
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _key(self, row: torch.Tensor) -> str:
        digest = hashlib.sha256(str(self.inner.weights_sha256).encode())
        digest.update(row.numpy().astype(np.int64).tobytes())
        return digest.hexdigest()[:40]

    def _lookup(self, key: str) -> torch.Tensor | None:
        if key not in self._hidden and self.cache_dir is not None and (self.cache_dir / f"{key}.pt").exists():
            self._hidden[key] = torch.load(self.cache_dir / f"{key}.pt")
        return self._hidden.get(key)

    def _store(self, key: str, hidden: torch.Tensor) -> None:
        self._hidden[key] = hidden.clone()
        if self.cache_dir is not None:
            tmp = self.cache_dir / f"{key}.pt.tmp"
            torch.save(self._hidden[key], tmp)
            os.replace(tmp, self.cache_dir / f"{key}.pt")

    @torch.inference_mode()
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, d]`` last hidden states of ``input_ids`` (int64[B, L]), computed once per row."""
        keys = [self._key(row) for row in input_ids.cpu()]
        missing = [i for i, key in enumerate(keys) if self._lookup(key) is None]
        if missing:
            out = self.inner.body(input_ids=input_ids[missing].to(self.inner.device), use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            for i, h in zip(missing, hidden):
                self._store(keys[i], h)
        return torch.stack([self._hidden[key] for key in keys])

    @torch.inference_mode()
    def _row_logits(self, row: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``[L, V]`` logits of one row, the head applied :data:`HEAD_CHUNK` positions at a time as
        capture applies it (the matmul's shape can change the last bit); kept with ``keep_logits``."""
        key = self._key(row)
        logits = self._logits.get(key)
        if logits is None:
            logits = torch.cat([z for _, z in head_chunks(self.inner.head, self.inner.post, hidden, HEAD_CHUNK)])
            if self.keep_logits:
                self._logits[key] = logits
        return logits

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, V]`` teacher logits (the head's dtype) of ``input_ids``."""
        hidden = self.hidden(input_ids)
        return torch.stack([self._row_logits(row, h) for row, h in zip(input_ids.cpu(), hidden)])

    @torch.inference_mode()
    def forward_chunks(self, input_ids: torch.Tensor, chunk: int):
        ids = self.inner._check_input(input_ids, chunk)
        hidden = self.hidden(ids)
        for row in range(hidden.shape[0]):
            if chunk == HEAD_CHUNK:
                logits = self._row_logits(ids[row].cpu(), hidden[row])
                chunks = ((start, logits[start:start + chunk]) for start in range(0, hidden.shape[1], chunk))
            else:
                chunks = head_chunks(self.inner.head, self.inner.post, hidden[row], chunk)
            for start, z in chunks:
                yield row, start, z

    def precompute(self, windows: np.ndarray, batch: int = 2, label: str = "teacher body") -> None:
        """Run the body over ``windows`` (int[W, L+1]; the teacher reads the first L tokens) in batches,
        printing progress; windows already cached (in memory or on disk) cost only a file read."""
        started, computed = time.perf_counter(), 0
        for s in range(0, len(windows), batch):
            ids = torch.from_numpy(np.asarray(windows[s:s + batch, :-1])).long()
            todo = sum(self._lookup(self._key(row)) is None for row in ids)
            self.hidden(ids)
            computed += todo * ids.shape[1]
            rate = computed / max(time.perf_counter() - started, 1e-9)
            print(f"\r{label}: {min(s + batch, len(windows))}/{len(windows)} windows "
                  f"({computed} tokens computed, {rate:.0f} tokens/s)", end="", flush=True)
        print(flush=True)


def load_cached_teacher(name: str = EMBEDDED_TEACHER, cache_dir: Path | None = None,
                        keep_logits: bool = False) -> CachedBodyTeacher:
    from logitcache.capture.teachers import load_teacher

    teacher = load_teacher(TeacherConfig(model=name, device="cpu", dtype="bfloat16"))
    return CachedBodyTeacher(teacher, cache_dir, keep_logits)


def corpus_plan(teacher, seq_len: int, corpus: str = BUILTIN_CORPUS) -> Plan:
    """The whole corpus as windows of ``seq_len`` (the same plan ``capture`` builds)."""
    return build_plan(read_documents(corpus), teacher.tokenizer, seq_len=seq_len, max_tokens=None,
                      eos_id=teacher.eos_id, max_positions=teacher.max_positions)


def heldout_windows(plan: Plan, count: int) -> range:
    """The last ``count`` windows of the corpus: the held-out slice no student trains on."""
    if not 1 <= count < plan.num_windows:
        raise ValueError(f"held-out windows must be in [1, {plan.num_windows}); found {count}")
    return range(plan.num_windows - count, plan.num_windows)


def update_results_md(section: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace ``<!-- {section}:begin -->…<!-- {section}:end -->`` in docs/results.md (append if absent)."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """This invocation as ``python benchmarks/<script> <arguments>``, for a results section."""
    return "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
