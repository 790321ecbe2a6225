"""Deterministic work units: documents → one packed token stream → overlapping windows → units.

Packing: each non-empty document is tokenized without special tokens and followed by one EOS;
the results are concatenated into ``tokens: int32[N]``. Window ``i`` is
``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (``seq_len + 1`` tokens): its first ``seq_len``
tokens are the input and its last ``seq_len`` the labels. Consecutive windows overlap by one
token, so every token but the first is a label exactly once. Only full windows are kept.

Sequence ids: ``seq_id(i)`` is a 63-bit integer derived from (corpus fingerprint, seq_len, i)
with blake2b. It depends on the corpus text and the window index only, not on the tokenizer, the
batch size or the worker count, so it can seed per-sequence randomness and name rows stably.

The corpus fingerprint is a sha256 over every document read (empty ones included), each as its
UTF-8 byte length (8 bytes, little-endian) followed by its UTF-8 bytes, in reading order.
Nothing here does I/O beyond iterating the documents it is given.

Memory. Documents of at most :data:`LONG_DOCUMENT_BYTES` are tokenized whole, in batches of at most
:data:`TOKENIZE_BATCH` documents and :data:`BATCH_CHARS` characters; a longer one is tokenized in
overlapping windows (:mod:`logitcache.capture.windowed`) with the same ids, so tokenizing holds a
bounded amount beside the packed stream (4 bytes a token) whatever a document's length. A
:class:`~logitcache.capture.corpus.TextFileDocument` (a large text file) is never held whole: its
pieces are hashed and fed to the windows as they are read, its UTF-8 length known from the file.
With ``max_tokens``, a long document that completes the wanted tokens is tokenized only that far: the
stream is cut right after them (no EOS follows), instead of ending with the whole document.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from .corpus import Document, TextFileDocument
from .windowed import WindowedTokenizer
from ..errors import ConfigError, CorpusError, TeacherError
from ..models.tokenizers import tokenizer_fingerprint

TOKENIZE_BATCH = 256  # documents per tokenizer call, at most
BATCH_CHARS = 1 << 18  # characters per tokenizer call, at most (a batch is cut before a document crosses it)
LONG_DOCUMENT_BYTES = 1 << 16  # UTF-8 bytes: a longer document is tokenized in windows (and cut at max_tokens)


@dataclass(frozen=True, eq=False)
class Plan:
    """A packed corpus cut into windows.

    ``tokens: int32[N]`` (read-only) is the packed stream; ``num_windows`` full windows of
    ``seq_len + 1`` tokens start at multiples of ``seq_len``. ``stats``: ``documents`` (read),
    ``empty_documents_skipped``, ``documents_tokenized``, ``tokens`` (= N), ``tokens_in_windows``
    (``num_windows * seq_len + 1``), ``tail_tokens_skipped`` (N minus that) and ``windows``.
    With ``max_tokens``, N covers only the documents tokenized before the limit was reached.
    """

    tokens: np.ndarray
    seq_len: int
    num_windows: int
    corpus_fingerprint: str
    stats: dict = field(default_factory=dict)

    def window(self, i: int) -> np.ndarray:
        """Window ``i`` as a read-only view: ``int32[seq_len + 1]``."""
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window index {i} out of range; the plan has {self.num_windows} windows")
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def windows(self, start: int, stop: int) -> np.ndarray:
        """Windows ``start..stop-1`` stacked (a copy): ``int32[stop - start, seq_len + 1]``."""
        if not 0 <= start <= stop <= self.num_windows:
            raise IndexError(f"window range {start}..{stop} out of range; the plan has {self.num_windows} windows")
        view = np.lib.stride_tricks.sliding_window_view(self.tokens, self.seq_len + 1)
        return np.array(view[start * self.seq_len : stop * self.seq_len : self.seq_len], dtype=np.int32)

    def seq_id(self, i: int) -> int:
        """Stable 63-bit id of window ``i`` (from corpus fingerprint, seq_len and ``i``)."""
        return seq_id_for(self.corpus_fingerprint, self.seq_len, i)

    @property
    def num_sequences(self) -> int:
        return self.num_windows

    @property
    def positions(self) -> int:
        """Positions with a target: every position of every window."""
        return self.num_windows * self.seq_len

    def slice(self, unit: Unit) -> PlanSlice:
        """The windows of ``unit`` only (what a Ray worker is sent)."""
        lo, hi = unit.start * self.seq_len, unit.stop * self.seq_len + 1
        return PlanSlice(np.array(self.tokens[lo:hi]), self.seq_len, unit.start, self.corpus_fingerprint)


@dataclass(frozen=True)
class PlanSlice:
    """The windows of one unit, indexed as in the whole plan: ``unit.size * seq_len + 1`` tokens, not the
    whole packed corpus."""

    tokens: np.ndarray
    seq_len: int
    first: int
    corpus_fingerprint: str

    @classmethod
    def of(cls, plan: Plan, unit: Unit) -> PlanSlice:
        return plan.slice(unit)

    def windows(self, start: int, stop: int) -> np.ndarray:
        view = np.lib.stride_tricks.sliding_window_view(self.tokens, self.seq_len + 1)
        lo, hi = (start - self.first) * self.seq_len, (stop - self.first) * self.seq_len
        return np.array(view[lo:hi:self.seq_len], dtype=np.int32)

    def seq_id(self, i: int) -> int:
        return seq_id_for(self.corpus_fingerprint, self.seq_len, i)


@dataclass(frozen=True)
class Unit:
    """A unit of work: windows ``start`` (inclusive) to ``stop`` (exclusive), numbered ``index``."""

    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def seq_id_for(corpus_fingerprint: str, seq_len: int, index: int, layout: str = "packed") -> int:
    """blake2b-64 of ``"{corpus_fingerprint}:{seq_len}:{index}"`` (``"{corpus_fingerprint}:{layout}:{seq_len}:{index}"``
    for another layout than ``packed``), masked to 63 bits (fits int64)."""
    key = f"{corpus_fingerprint}:{seq_len}:{index}" if layout == "packed" else \
        f"{corpus_fingerprint}:{layout}:{seq_len}:{index}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def build_plan(
    documents: Iterable[Document | TextFileDocument],
    tokenizer,
    *,
    seq_len: int,
    max_tokens: int | None,
    eos_id: int | None = None,
    max_positions: int | None = None,
) -> Plan:
    """Tokenize and pack ``documents`` into windows of ``seq_len + 1`` tokens.

    ``max_tokens`` keeps the first ``ceil(max_tokens / seq_len)`` windows; tokenizing then stops at
    the first document that completes them (within it, if it is longer than :data:`LONG_DOCUMENT_BYTES`),
    but every document is still read into the corpus fingerprint, so seq ids equal those of the
    unlimited plan. ``eos_id`` defaults to ``tokenizer.eos_token_id``. ``max_positions`` (the
    teacher's context) must be ``>= seq_len`` (the teacher reads the first ``seq_len`` tokens of each window).
    Raises :class:`CorpusError` for an empty or too-short corpus, :class:`TeacherError` if the
    window does not fit the teacher.
    """
    _check_args(seq_len, max_tokens, max_positions)
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise CorpusError(
            "the tokenizer has no eos_token_id and no eos_id was given; expected one to separate "
            "documents. Pass eos_id or use a tokenizer with an EOS token"
        )
    wanted = None if max_tokens is None else math.ceil(max_tokens / seq_len) * seq_len + 1
    packer = _Packer(tokenizer, int(eos), wanted)
    for doc in documents:
        packer.read(doc)
    tokens = packer.result()
    _check_counts(packer, tokens.size, seq_len)
    num_windows = (tokens.size - 1) // seq_len
    if max_tokens is not None:
        num_windows = min(num_windows, math.ceil(max_tokens / seq_len))
    in_windows = num_windows * seq_len + 1
    stats = {
        "documents": packer.documents,
        "empty_documents_skipped": packer.empty,
        "documents_tokenized": packer.tokenized,
        "tokens": int(tokens.size),
        "tokens_in_windows": in_windows,
        "tail_tokens_skipped": int(tokens.size) - in_windows,
        "windows": num_windows,
    }
    tokens.flags.writeable = False
    return Plan(tokens, seq_len, num_windows, packer.hasher.hexdigest(), stats)


def plan_units(plan, sequences_per_shard: int) -> list[Unit]:
    """Consecutive runs of ``sequences_per_shard`` sequences of ``plan`` (a :class:`Plan` or a
    :class:`~logitcache.capture.documents.DocumentPlan`); the last unit may be shorter."""
    if sequences_per_shard < 1:
        raise ConfigError(f"sequences_per_shard must be >= 1; found {sequences_per_shard}")
    total = plan.num_sequences
    starts = range(0, total, sequences_per_shard)
    return [Unit(index=n, start=s, stop=min(s + sequences_per_shard, total)) for n, s in enumerate(starts)]


def _check_args(seq_len: int, max_tokens: int | None, max_positions: int | None) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be an integer >= 1; found {seq_len!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1 or unset; found {max_tokens!r}")
    if max_positions is not None and seq_len > max_positions:
        raise TeacherError(
            f"seq_len = {seq_len} (the teacher reads seq_len tokens of each seq_len + 1 window) exceeds the "
            f"teacher's max_positions = {max_positions}; lower --seq-len to at most {max_positions}"
        )


class _Packer:
    """Hashes every document and packs the tokens of the non-empty ones (each + EOS) as int32 chunks,
    until ``wanted`` tokens are reached. Short documents wait in a batch; a long one flushes it first."""

    def __init__(self, tokenizer, eos: int, wanted: int | None) -> None:
        self.tokenizer, self.eos, self.wanted = tokenizer, eos, wanted
        self.hasher = hashlib.sha256()
        self.chunks: list[np.ndarray] = []
        self.batch: list[str] = []
        self.batch_chars = 0
        self.count = self.documents = self.empty = self.tokenized = 0

    @property
    def full(self) -> bool:
        return self.wanted is not None and self.count >= self.wanted

    def read(self, doc: Document | TextFileDocument) -> None:
        self.documents += 1
        if isinstance(doc, TextFileDocument):  # larger than corpus.PIECE_BYTES, so long
            self.flush()
            self._add_long(doc.pieces(), doc.size)
            return
        text = doc.text
        if len(text) > LONG_DOCUMENT_BYTES // 4 and (size := _utf8_length(text)) > LONG_DOCUMENT_BYTES:
            self.flush()  # a character is at most 4 bytes: a shorter text is not long
            self._add_long(doc.pieces(), size)
            return
        data = text.encode("utf-8")
        self.hasher.update(len(data).to_bytes(8, "little"))
        self.hasher.update(data)
        if not text.strip():
            self.empty += 1
        elif not self.full:
            if self.batch and (len(self.batch) >= TOKENIZE_BATCH or self.batch_chars + len(text) > BATCH_CHARS):
                self.flush()
            self.batch.append(text)
            self.batch_chars += len(text)

    def flush(self) -> None:
        """Tokenize the waiting short documents; stop at the one that completes the wanted tokens."""
        if not self.batch or self.full:
            self.batch, self.batch_chars = [], 0
            return
        ids = self.tokenizer(self.batch, add_special_tokens=False, verbose=False)["input_ids"]
        self.batch, self.batch_chars = [], 0
        kept = []
        for doc_ids in ids:
            if self.full:
                break
            if len(doc_ids) == 0:
                self.empty += 1
                continue
            kept.append(doc_ids)
            self.count += len(doc_ids) + 1
        total = sum(len(d) + 1 for d in kept)
        self.chunks.append(np.fromiter(chain.from_iterable(chain(d, (self.eos,)) for d in kept), dtype=np.int32,
                                       count=total))
        self.tokenized += len(kept)

    def _add_long(self, pieces: Iterable[str], size: int) -> None:
        """Hash the text (``size`` UTF-8 bytes, read as ``pieces``) in slices and tokenize it in windows
        while tokens are wanted; a document cut at the wanted tokens gets no EOS. Whitespace waits
        until text follows it, so a whitespace-only document is never tokenized (as a short one)."""
        self.hasher.update(size.to_bytes(8, "little"))
        windows = None if self.full else WindowedTokenizer(self.tokenizer)
        tokenizing, blank, waiting, got = windows is not None, True, [], 0
        for piece in (p[i : i + _SLICE_CHARS] for p in pieces for i in range(0, len(p), _SLICE_CHARS)):
            self.hasher.update(piece.encode("utf-8"))
            blank = blank and piece.isspace()  # as `not piece.strip()`, without the copy
            if windows is None:
                continue
            waiting.append(piece)
            if not blank:
                got += self._take(windows.feed("".join(waiting)))
                waiting, windows = [], None if self.full else windows  # cut: the rest is only hashed
        if windows is not None and not blank:
            got += self._take(windows.finish())
            if got:
                self._take([np.array([self.eos], dtype=np.int32)])
        if blank or (tokenizing and not got):
            self.empty += 1
        elif got:
            self.tokenized += 1

    def _take(self, arrays: list[np.ndarray]) -> int:
        """Append ``arrays`` up to the wanted tokens; how many tokens were appended."""
        taken = 0
        for ids in arrays:
            if self.wanted is not None:
                ids = ids[: self.wanted - self.count]
            self.chunks.append(ids)
            self.count += ids.size
            taken += ids.size
        return taken

    def result(self) -> np.ndarray:
        """The packed stream ``int32[N]``."""
        self.flush()
        return np.concatenate(self.chunks) if self.chunks else np.empty(0, dtype=np.int32)


_SLICE_CHARS = 1 << 14  # a long document is hashed and fed to the windowed tokenizer in slices this long


def _utf8_length(text: str) -> int:
    if text.isascii():
        return len(text)
    return sum(len(text[i : i + _SLICE_CHARS].encode("utf-8")) for i in range(0, len(text), _SLICE_CHARS))


def _check_counts(packer: _Packer, num_tokens: int, seq_len: int) -> None:
    if packer.documents == 0:
        raise CorpusError("empty corpus: the source yielded no documents; expected at least one. Check the source")
    if packer.tokenized == 0:
        raise CorpusError(
            f"all {packer.documents} documents are empty or whitespace-only; expected some text. "
            "Check --text-field and the source"
        )
    if num_tokens < seq_len + 1:
        raise CorpusError(
            f"the corpus has {num_tokens} tokens ({packer.tokenized} documents with EOS); one window needs "
            f"seq_len + 1 = {seq_len + 1}. Lower --seq-len or add text"
        )


__all__ = ["Plan", "PlanSlice", "Unit", "build_plan", "plan_units", "seq_id_for", "tokenizer_fingerprint"]
