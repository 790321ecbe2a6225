"""Shared by benchmarks/estimators.py and benchmarks/students.py: the teacher with a body cache,
the held-out split of the corpus, bytes per position from the store's encoder, and the
docs/results.md section writer."""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from logitcache.capture.config import BUILTIN_CORPUS, EMBEDDED_TEACHER, TeacherConfig
from logitcache.capture.corpus import read_documents
from logitcache.capture.plan import Plan, build_plan
from logitcache.store.writer import encode_unit
from logitcache.store.encoding import DEFAULT_ID_CODEC, Encoding, corpus_order
from logitcache.store.spec import ShardSpec
from logitcache.targets import SparseTargets

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "docs" / "results.md"


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
    window) are kept per window; the output head runs on demand. Several captures of the same
    windows, and the online full-KD teacher, then cost only the head. Everything else is the
    wrapped teacher's.
    """

    def __init__(self, teacher) -> None:
        self.inner = teacher
        self._hidden: dict[bytes, torch.Tensor] = {}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    @torch.inference_mode()
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, d]`` last hidden states of ``input_ids`` (int64[B, L]), computed once per row."""
        keys = [row.numpy().astype(np.int64).tobytes() for row in input_ids.cpu()]
        missing = [i for i, key in enumerate(keys) if key not in self._hidden]
        if missing:
            out = self.inner.body(input_ids=input_ids[missing].to(self.inner.device), use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            for i, h in zip(missing, hidden):
                self._hidden[keys[i]] = h.clone()
        return torch.stack([self._hidden[key] for key in keys])

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L, V]`` teacher logits (the head's dtype) of ``input_ids``."""
        return self.inner.post.apply(self.inner.head(self.hidden(input_ids)))

    def forward_chunks(self, input_ids: torch.Tensor, chunk: int):
        ids = self.inner._check_input(input_ids, chunk)
        hidden = self.hidden(ids)
        for row in range(hidden.shape[0]):
            for start in range(0, hidden.shape[1], chunk):
                with torch.inference_mode():
                    yield row, start, self.inner.post.apply(self.inner.head(hidden[row, start:start + chunk]))


def load_cached_teacher(name: str = EMBEDDED_TEACHER) -> CachedBodyTeacher:
    from logitcache.capture.teachers import load_teacher

    return CachedBodyTeacher(load_teacher(TeacherConfig(model=name, device="cpu", dtype="bfloat16")))


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
