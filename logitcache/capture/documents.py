"""The ``documents`` layout: one document or conversation is one sequence, with a per-position train mask.

Where :mod:`logitcache.capture.plan` packs a corpus into one stream cut into windows (the teacher then
attends across unrelated documents), this plan keeps sequences apart: sequence ``i`` is ``tokens_i:
int32[L_i]`` (``2 <= L_i <= seq_len + 1``) with ``mask_i: bool[L_i - 1]``, where ``mask_i[t]`` says whether
position ``t`` (predicting token ``t + 1``) trains. The teacher reads each sequence alone, and the store
keeps targets at the trained positions only (docs/format.md, "Layouts").

Where sequences come from:

- a **text** corpus: each non-empty document's tokens (no special tokens) followed by one EOS; every
  position trains (``train_on`` must be ``all``). A document over :data:`LONG_DOCUMENT_BYTES` is tokenized
  in windows (:mod:`logitcache.capture.windowed`), with the same ids.
- a **chat** corpus (:attr:`Corpus.chat`): each row is read by :func:`~logitcache.capture.chat.conversation_from_row`
  and rendered by :func:`~logitcache.capture.chat.render` with the chat template and ``train_on``
  (default ``assistant``); the mask is the token mask shifted by one (:func:`chat.trained_positions`). A
  conversation without an assistant turn to train is skipped and counted.

A sequence longer than ``seq_len + 1`` tokens follows ``long_sequences``: ``truncate`` keeps its first
``seq_len + 1`` tokens; ``split`` cuts it into chunks of ``seq_len + 1`` tokens overlapping by one (as
packed windows do; the last chunk may be shorter), so every position trains exactly once, each chunk
without the context before it; ``skip`` leaves it out. A sequence or chunk left with no trained position
(or under two tokens) is dropped. Every such case is counted in :attr:`DocumentPlan.stats`.

The corpus fingerprint is a sha256 over every document (as in the packed plan) or every row (its canonical
JSON, length-prefixed), in reading order, all of them read even when ``max_tokens`` stops the plan early.
Sequence ids: :func:`~logitcache.capture.plan.seq_id_for` with layout ``documents``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from . import chat
from .corpus import Corpus, Document, TextFileDocument
from .plan import LONG_DOCUMENT_BYTES, Unit, seq_id_for
from .windowed import WindowedTokenizer
from ..errors import CorpusError

LAYOUT = "documents"


@dataclass(frozen=True)
class Sequence:
    """One sequence: ``tokens int32[L]`` and ``mask bool[L - 1]`` (position ``t`` trains)."""

    tokens: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class LayoutSection:
    """How the corpus became sequences (the manifest's ``corpus.layout``, compared on resume)."""

    name: str
    long_sequences: str
    train_on: str
    chat_template_sha256: str | None = None

    def to_dict(self) -> dict:
        out = {"name": self.name, "long_sequences": self.long_sequences, "train_on": self.train_on}
        return out if self.chat_template_sha256 is None else {**out, "chat_template_sha256": self.chat_template_sha256}


@dataclass(frozen=True, eq=False)
class DocumentPlan:
    """Sequences ``first .. first + num_sequences - 1`` of a documents plan, end to end.

    ``tokens int32[sum L]`` and ``masks bool[sum (L - 1)]`` (read-only); sequence ``i`` is
    ``tokens[offsets[j]:offsets[j + 1]]`` for ``j = i - first``. A plan of the whole corpus has ``first = 0``;
    :meth:`slice` gives a unit's part (what a Ray worker is sent).
    """

    tokens: np.ndarray
    offsets: np.ndarray
    masks: np.ndarray
    seq_len: int
    corpus_fingerprint: str
    layout: LayoutSection
    stats: dict = field(default_factory=dict)
    first: int = 0

    @property
    def num_sequences(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def positions(self) -> int:
        """Trained positions in the plan (what the store holds targets for)."""
        return int(self.masks.sum())

    def sequence(self, i: int) -> Sequence:
        j = i - self.first
        if not 0 <= j < self.num_sequences:
            raise IndexError(f"sequence {i} is outside this plan's {self.first}..{self.first + self.num_sequences - 1}")
        lo, hi = int(self.offsets[j]), int(self.offsets[j + 1])
        return Sequence(self.tokens[lo:hi], self.masks[lo - j:hi - j - 1])

    def seq_id(self, i: int) -> int:
        return seq_id_for(self.corpus_fingerprint, self.seq_len, i, layout=LAYOUT)

    def slice(self, unit: Unit) -> DocumentPlan:
        """The sequences of ``unit`` only, indexed as in this plan."""
        lo, hi = unit.start - self.first, unit.stop - self.first
        t0, t1 = int(self.offsets[lo]), int(self.offsets[hi])
        return DocumentPlan(np.array(self.tokens[t0:t1]), self.offsets[lo:hi + 1] - t0,
                            np.array(self.masks[t0 - lo:t1 - hi]), self.seq_len, self.corpus_fingerprint,
                            self.layout, {}, unit.start)


def build_document_plan(corpus: Corpus, tokenizer, *, seq_len: int, max_tokens: int | None, eos_id: int,
                        long_sequences: str, train_on: str | None, chat_template: str | None) -> DocumentPlan:
    """The documents plan of ``corpus`` (see the module docstring). ``chat_template``: template text or None
    (the tokenizer's). ``max_tokens`` keeps whole sequences until their tokens reach it. Raises
    :class:`CorpusError` when no sequence remains, naming what was skipped."""
    if corpus.chat:
        template = chat.resolve_chat_template(tokenizer, chat_template)
        train_on = train_on or "assistant"
        layout = LayoutSection(LAYOUT, long_sequences, train_on, chat.template_sha256(template))
        reader = _ChatReader(tokenizer, template, train_on)
    else:
        if train_on not in (None, "all"):
            raise CorpusError(f"train_on {train_on!r} needs a chat corpus; {corpus.source} holds text, where every "
                              "position trains. Drop --train-on (or pass all)")
        if chat_template is not None:
            raise CorpusError(f"a chat template was given but {corpus.source} holds text, not conversations; drop "
                              "--chat-template, or use a corpus with messages / conversations / prompt+completion")
        layout = LayoutSection(LAYOUT, long_sequences, "all")
        reader = _TextReader(tokenizer, eos_id)
    cutter = _Cutter(seq_len, long_sequences, max_tokens)
    for sequence in reader.sequences(corpus, cutter):
        cutter.add(sequence)
    stats = {"documents": reader.read, **reader.stats, **cutter.stats}
    if not cutter.kept:
        raise CorpusError(f"no sequence of {corpus.source} has a position to train ({_summary(stats)}); expected at "
                          "least one. Check the corpus, --train-on and --long-sequences")
    tokens = np.concatenate([s.tokens for s in cutter.kept]).astype(np.int32)
    masks = np.concatenate([s.mask for s in cutter.kept]).astype(bool)
    offsets = np.concatenate([[0], np.cumsum([s.tokens.size for s in cutter.kept])]).astype(np.int64)
    tokens.flags.writeable = masks.flags.writeable = False
    return DocumentPlan(tokens, offsets, masks, seq_len, reader.hasher.hexdigest(), layout, stats)


def _summary(stats: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items() if v)


class _Cutter:
    """Applies the long-sequence policy and ``max_tokens``; keeps the sequences and counts what it did."""

    def __init__(self, seq_len: int, policy: str, max_tokens: int | None) -> None:
        self.limit, self.policy, self.max_tokens = seq_len + 1, policy, max_tokens
        self.kept: list[Sequence] = []
        self.tokens = 0
        self.stats = {"sequences": 0, "tokens": 0, "trained_positions": 0, "truncated": 0, "tokens_truncated": 0,
                      "split": 0, "skipped_long": 0, "skipped_untrained": 0}

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.tokens >= self.max_tokens

    def add(self, seq: Sequence) -> None:
        if self.full:
            return
        n = seq.tokens.size
        if n > self.limit:
            if self.policy == "skip":
                self.stats["skipped_long"] += 1
                return
            if self.policy == "truncate":
                self.stats["truncated"] += 1
                self.stats["tokens_truncated"] += n - self.limit
                seq = Sequence(seq.tokens[: self.limit], seq.mask[: self.limit - 1])
            else:
                self.stats["split"] += 1
                step = self.limit - 1
                for lo in range(0, n - 1, step):
                    self._keep(Sequence(seq.tokens[lo : lo + self.limit], seq.mask[lo : lo + step]))
                return
        self._keep(seq)

    def _keep(self, seq: Sequence) -> None:
        if self.full:
            return
        if seq.tokens.size < 2 or not seq.mask.any():
            self.stats["skipped_untrained"] += 1
            return
        self.kept.append(seq)
        self.tokens += seq.tokens.size
        self.stats["sequences"] += 1
        self.stats["tokens"] += int(seq.tokens.size)
        self.stats["trained_positions"] += int(seq.mask.sum())


class _TextReader:
    """Text documents → sequences (tokens + EOS, every position trained); hashes every document."""

    def __init__(self, tokenizer, eos: int) -> None:
        self.tokenizer, self.eos = tokenizer, int(eos)
        self.hasher = hashlib.sha256()
        self.read = 0
        self.stats = {"empty_documents_skipped": 0}

    def sequences(self, corpus: Corpus, cutter: _Cutter) -> Iterator[Sequence]:
        for doc in corpus.documents():
            self.read += 1
            ids = self._ids(doc, tokenize=not cutter.full)
            if ids is None:
                continue
            if ids.size == 0:
                self.stats["empty_documents_skipped"] += 1
                continue
            tokens = np.append(ids, np.int32(self.eos)).astype(np.int32)
            yield Sequence(tokens, np.ones(tokens.size - 1, dtype=bool))

    def _ids(self, doc: Document | TextFileDocument, *, tokenize: bool) -> np.ndarray | None:
        """The document's ids (hashed either way); None when not ``tokenize`` (the plan is full)."""
        size = doc.size if isinstance(doc, TextFileDocument) else None
        if size is None and len(doc.text) <= LONG_DOCUMENT_BYTES // 4:
            data = doc.text.encode("utf-8")
            self.hasher.update(len(data).to_bytes(8, "little"))
            self.hasher.update(data)
            if not tokenize:
                return None
            if not doc.text.strip():
                return np.empty(0, dtype=np.int32)
            return np.asarray(self.tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"],
                              dtype=np.int32)
        pieces = list(doc.pieces()) if size is None else None  # a long in-memory text: hash its UTF-8 length
        if size is None:
            size = sum(len(p.encode("utf-8")) for p in pieces)
        self.hasher.update(size.to_bytes(8, "little"))
        windows, parts, blank = WindowedTokenizer(self.tokenizer), [], True
        for piece in pieces if pieces is not None else doc.pieces():
            self.hasher.update(piece.encode("utf-8"))
            blank = blank and piece.isspace()
            if tokenize:
                parts += windows.feed(piece)
        if not tokenize:
            return None
        if blank:
            return np.empty(0, dtype=np.int32)
        parts += windows.finish()
        return np.concatenate(parts).astype(np.int32) if parts else np.empty(0, dtype=np.int32)


class _ChatReader:
    """Chat rows → rendered sequences; hashes every row's canonical JSON."""

    def __init__(self, tokenizer, template: str, train_on: str) -> None:
        self.tokenizer, self.template, self.train_on = tokenizer, template, train_on
        self.hasher = hashlib.sha256()
        self.read = 0
        self.stats = {"conversations_without_assistant": 0}

    def sequences(self, corpus: Corpus, cutter: _Cutter) -> Iterator[Sequence]:
        shape = None
        for origin, row in corpus.rows():
            self.read += 1
            data = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()
            self.hasher.update(len(data).to_bytes(8, "little"))
            self.hasher.update(data)
            if cutter.full:
                continue
            shape = shape or chat.row_shape(row, where=origin)
            conversation = chat.conversation_from_row(row, where=origin, shape=shape)
            if self.train_on != "all" and not conversation.has_assistant:
                self.stats["conversations_without_assistant"] += 1
                continue
            rendered = chat.render(conversation, self.tokenizer, chat_template=self.template, train_on=self.train_on)
            yield Sequence(rendered.input_ids.astype(np.int32), chat.trained_positions(rendered.mask))


__all__ = ["DocumentPlan", "LayoutSection", "Sequence", "build_document_plan"]
