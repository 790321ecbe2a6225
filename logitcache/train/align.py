"""Cross-tokenizer alignment by byte spans (pure functions; docs/cross_tokenizer.md).

A stored sequence is teacher token ids only; its text is the concatenation of the bytes each id stands
for (:func:`token_bytes_table`), so no original text is needed. A student tokenizer re-tokenizes that
text (:func:`encode_student`), and :func:`align` cuts both byte-span sequences into the minimal groups
whose boundaries coincide: 1:1, many teacher : one student, one : many, or many : many. The groups
partition the bytes: every byte lies in exactly one group.

Token bytes are known for two tokenizer families, read from the fast tokenizer's decoder:

* byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): each character of a token is one byte of the GPT-2
  byte alphabet;
* SentencePiece style (Metaspace or a ``Replace("▁", " ")`` decoder; BPE or Unigram): ``▁`` is a space
  and byte-fallback tokens ``<0xNN>`` are the byte ``NN``.

Added tokens (specials such as ``<|im_start|>``) stand for their text. The unknown token has no bytes.
Any other tokenizer (WordPiece, a slow tokenizer) is refused with :class:`~logitcache.errors.ConfigError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import ConfigError, TargetsError

__all__ = ["Alignment", "StudentText", "TokenBytes", "align", "encode_student", "token_bytes_table"]

BYTE_LEVEL, SENTENCEPIECE = "byte_level", "sentencepiece"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, character → byte: printable bytes stand for themselves, the other
    bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@dataclass(frozen=True)
class TokenBytes:
    """The bytes each id of one tokenizer stands for: ``table[id]``, ``None`` where they are unknown.

    Lookups of many ids are vectorised over :attr:`packed` (every id's bytes in one buffer)."""

    kind: str  # BYTE_LEVEL or SENTENCEPIECE
    table: tuple[bytes | None, ...]

    def __len__(self) -> int:
        return len(self.table)

    @cached_property
    def packed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(buffer uint8[·], starts int64[V], sizes int64[V])``: id ``i``'s bytes are
        ``buffer[starts[i]: starts[i] + sizes[i]]``; ``sizes[i]`` is −1 where they are unknown."""
        sizes = np.fromiter((-1 if p is None else len(p) for p in self.table), dtype=np.int64, count=len(self.table))
        starts = np.cumsum(np.maximum(sizes, 0)) - np.maximum(sizes, 0)
        buffer = np.frombuffer(b"".join(p or b"" for p in self.table), dtype=np.uint8)
        return buffer, starts, sizes

    def sizes_of(self, ids: np.ndarray) -> np.ndarray:
        """``int64[n]`` byte length of each id, −1 where unknown (also for ids outside the vocabulary)."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self.table))
        return np.where(inside, self.packed[2][np.where(inside, ids, 0)], -1)

    def lengths(self, ids: np.ndarray, where: str) -> np.ndarray:
        """``int64[n]`` byte length of each id; :class:`TargetsError` (naming ``where``) for an unknown one."""
        sizes = self.sizes_of(ids)
        if (sizes < 0).any():
            bad = sorted(set(np.asarray(ids)[sizes < 0].tolist()))
            raise TargetsError(f"{where}: token ids {bad[:5]} have no known bytes (the unknown token, "
                               f"or ids outside the {len(self.table)}-entry vocabulary); expected ids whose text is "
                               "known, as a store captured with this tokenizer holds")
        return sizes

    def join(self, ids: np.ndarray) -> bytes:
        """The concatenated bytes of ``ids`` (every one known)."""
        buffer, starts, _ = self.packed
        sizes = self.lengths(ids, "join")
        ids = np.asarray(ids, dtype=np.int64)
        index = np.repeat(starts[ids] - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))
        return buffer[index].tobytes()


def _decoder_types(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [d for child in node.get("decoders", []) for d in _decoder_types(child)]
    return [node]


def tokenizer_kind(tokenizer) -> str:
    """``"byte_level"`` or ``"sentencepiece"``, read from the fast tokenizer's decoder; else ConfigError."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    name = type(tokenizer).__name__
    if backend is None:
        raise ConfigError(f"tokenizer {name} has no fast (Rust) backend; cross-tokenizer alignment needs a "
                          "PreTrainedTokenizerFast (AutoTokenizer.from_pretrained(..., use_fast=True))")
    spec = json.loads(backend.to_str())
    decoders = _decoder_types(spec.get("decoder"))
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types:
        return BYTE_LEVEL
    if "Metaspace" in types or any(d.get("type") == "Replace" and "▁" in json.dumps(d, ensure_ascii=False)
                                   for d in decoders):
        return SENTENCEPIECE
    model = spec.get("model", {}).get("type")
    raise ConfigError(f"tokenizer {name} (model {model}, decoders {sorted(map(str, types))}) "
                      "has no known token bytes; expected a byte-level BPE (ByteLevel decoder) or a SentencePiece-"
                      "style tokenizer (Metaspace or Replace('▁', ' ') decoder)")


def token_bytes_table(tokenizer) -> TokenBytes:
    """The :class:`TokenBytes` of ``tokenizer`` (every id below ``len(tokenizer)``)."""
    kind = tokenizer_kind(tokenizer)
    table: list[bytes | None] = [None] * len(tokenizer)
    alphabet = _byte_alphabet() if kind == BYTE_LEVEL else None
    for token, i in tokenizer.get_vocab().items():
        if i < len(table):
            table[i] = _regular_bytes(token, alphabet)
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < len(table):
            table[i] = added.content.encode("utf-8")
    unk = getattr(tokenizer, "unk_token_id", None)
    others = {getattr(tokenizer, f"{name}_token_id", None) for name in ("eos", "bos", "pad")}
    if kind == SENTENCEPIECE and unk is not None and unk < len(table) and unk not in others:
        table[unk] = None  # stands for any text the vocabulary lacks (a byte-level vocabulary lacks none)
    return TokenBytes(kind, tuple(table))


def _regular_bytes(token: str, alphabet: dict[str, int] | None) -> bytes | None:
    if alphabet is not None:
        if not all(c in alphabet for c in token):
            return None  # not a byte-level token: its bytes are unknown
        return bytes(alphabet[c] for c in token)
    fallback = _BYTE_TOKEN.fullmatch(token)
    return bytes([int(fallback.group(1), 16)]) if fallback else token.replace("▁", " ").encode("utf-8")


@dataclass(frozen=True)
class StudentText:
    """The student's tokens of a text: ``ids int64[n]`` and ``ends int64[n]`` (the byte where each ends;
    token ``k`` spans ``[ends[k-1], ends[k])``, from ``lo``). ``[0, lo)`` and ``[hi, len)`` are the bytes that
    are no whole UTF-8 character (a window cut through one); no student token covers them."""

    ids: np.ndarray
    ends: np.ndarray
    lo: int
    hi: int
    size: int

    def span_ends(self) -> np.ndarray:
        """Ends of every span the alignment sees: ``[lo]`` (when ``lo > 0``), the tokens, ``[size]`` (when
        ``hi < size``); :attr:`first` is the index of the first token among them."""
        return np.concatenate([[self.lo] if self.lo else [], self.ends, [self.size] if self.hi < self.size else []]
                              ).astype(np.int64)

    @property
    def first(self) -> int:
        return 1 if self.lo else 0


def _whole_characters(data: bytes) -> tuple[int, int]:
    """``(lo, hi)``: ``data[lo:hi]`` without the partial UTF-8 characters a cut left at either end."""
    lo = 0
    while lo < min(3, len(data)) and 0x80 <= data[lo] < 0xC0:
        lo += 1
    hi = len(data)
    for back in range(1, min(4, hi - lo) + 1):  # a lead byte whose character does not fit before the end
        b = data[hi - back]
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if need > back:
                hi -= back
            break
        if b < 0x80:
            break
    return lo, hi


def encode_student(tokenizer, table: TokenBytes, data: bytes, where: str = "text") -> StudentText:
    """Re-tokenize ``data`` (no special tokens added). The spans are the student's own token bytes when they
    rebuild the text exactly (a SentencePiece dummy-prefix space on the first token is allowed for); else
    the fast tokenizer's offsets, each token running to where the next starts."""
    lo, hi = _whole_characters(data)
    try:
        text = data[lo:hi].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = lo + exc.start
        raise TargetsError(f"{where}: the teacher tokens' bytes are not UTF-8 at byte {at} ({data[at: at + 4]!r}); "
                           "expected text a tokenizer produced") from exc
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    ends = _own_ends(table, ids, data[lo:hi])
    if ends is None:
        ends = _offset_ends(text, enc["offset_mapping"])
    return StudentText(ids, ends + lo, lo, hi, len(data))


def _own_ends(table: TokenBytes, ids: np.ndarray, text: bytes) -> np.ndarray | None:
    lengths = table.sizes_of(ids)
    if (lengths < 0).any():
        return None
    joined = table.join(ids)
    if joined == b" " + text and lengths.size and joined[:1] == b" " and lengths[0] > 0:
        lengths[0] -= 1  # the dummy prefix SentencePiece adds before the first word
    elif joined != text:
        return None
    return np.cumsum(lengths)


def _offset_ends(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    char_end = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])]).astype(np.int64)
    starts = np.asarray([s for s, _ in offsets], dtype=np.int64).reshape(-1)
    ends = np.concatenate([char_end[starts[1:]], [char_end[-1]]]) if starts.size else starts
    return np.maximum.accumulate(ends) if ends.size else ends


@dataclass(frozen=True)
class Alignment:
    """Groups of two span sequences over the same bytes: ``bounds int64[G+1]`` (group ``g`` is bytes
    ``[bounds[g], bounds[g+1])``), ``teacher_group int64[n_t]`` and ``student_group int64[n_s]`` (each
    span's group), and per group its span counts ``teacher_count``/``student_count`` and first spans."""

    bounds: np.ndarray
    teacher_group: np.ndarray
    student_group: np.ndarray

    @property
    def num_groups(self) -> int:
        return int(self.bounds.size - 1)

    @property
    def teacher_count(self) -> np.ndarray:
        return np.bincount(self.teacher_group, minlength=self.num_groups)

    @property
    def student_count(self) -> np.ndarray:
        return np.bincount(self.student_group, minlength=self.num_groups)

    @property
    def teacher_first(self) -> np.ndarray:
        """``int64[G]`` the first teacher span of each group."""
        return np.cumsum(self.teacher_count) - self.teacher_count


def align(teacher_ends: np.ndarray, student_ends: np.ndarray) -> Alignment:
    """The minimal groups whose boundaries coincide, of two span sequences given by their end bytes
    (non-decreasing, both ending at the same byte; a zero-width span joins the group it ends in)."""
    t, s = np.asarray(teacher_ends, dtype=np.int64), np.asarray(student_ends, dtype=np.int64)
    if t.size == 0 or s.size == 0 or t[-1] != s[-1]:
        raise TargetsError(f"spans to align end at byte {t[-1] if t.size else None} (teacher) and "
                           f"{s[-1] if s.size else None} (student); expected both to cover the same bytes")
    common = np.intersect1d(t[t > 0], s[s > 0])
    return Alignment(np.concatenate([[0], common]), np.searchsorted(common, t), np.searchsorted(common, s))
