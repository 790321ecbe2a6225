"""Tokenizing a long text in bounded memory, with the ids of tokenizing it whole.

One tokenizer call on a long string costs ~120-260 bytes of memory per character (offsets,
encodings, Python ints), so a 24 MB document needed gigabytes. :class:`WindowedTokenizer` is fed
the text in pieces and tokenizes it in overlapping windows of ``window`` characters that start
``window - overlap`` characters apart; it never holds more than about two windows of text.

Stitching. No split rule is exact for every tokenizer (byte-level BPE keeps a whitespace run
before a word, SentencePiece prepends ``▁`` to each input), so windows are joined where two
tokenizations agree: in the overlap of windows ``a`` and ``b`` the *sync point* is the first
character offset at which both have a token starting and from which their next :data:`AGREE`
tokens (ids and offsets) are identical. Tokens of ``a`` before it and of ``b`` from it on are
kept. ``a``'s tokens there are far from its truncated end and ``b``'s have left its arbitrary
start behind, so both equal the whole-text tokens. Where no sync point exists (one token or
pre-token spanning the whole overlap) the rest of the text is tokenized in one call from the last
trusted window: still exact, but that document's memory then grows with its length (so does a
tokenizer without offsets, a "slow" one: it tokenizes the whole text in one call).
tests/unit/test_plan.py checks the ids against whole-text tokenization on Python's sources and
help topics with the tiny teacher's and SmolLM2's tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

WINDOW_CHARS = 1 << 16
OVERLAP_CHARS = 1 << 12
AGREE = 32


@dataclass(frozen=True)
class _Tokens:
    """One window's tokens: ``ids`` and ``starts``/``ends`` (character offsets in the document)."""

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


class WindowedTokenizer:
    """``feed`` text pieces, then ``finish``; each returns the ids (``int32``) that became final."""

    def __init__(self, tokenizer, *, window: int = WINDOW_CHARS, overlap: int = OVERLAP_CHARS) -> None:
        if not 0 < overlap < window:
            raise ConfigError(f"tokenizer windows need 0 < overlap < window; found overlap {overlap}, window {window}")
        self.tokenizer, self.window, self.stride = tokenizer, window, window - overlap
        self.buffer = ""  # text from document offset `base` on
        self.base = 0
        self.prev: _Tokens | None = None  # tokens of the window starting at `base`
        self.trusted = 0  # index of prev's first token not yet returned
        # the rest is tokenized in one call: no sync point was found, or the tokenizer gives no offsets
        self.whole = not getattr(tokenizer, "is_fast", False)

    def feed(self, piece: str) -> list[np.ndarray]:
        self.buffer += piece
        out = []
        while not self.whole and len(self.buffer) > (self.window if self.prev is None else self.stride + self.window):
            out += self._advance()
        return out

    def finish(self) -> list[np.ndarray]:
        """The remaining ids; the text is complete."""
        if self.prev is None:
            return [self._ids(self.buffer)]
        if not self.whole:
            cur = self._tokenize(self.buffer[self.stride:], self.base + self.stride)
            sync = _sync_point(self.prev, self.trusted, cur)
            if sync is not None:
                return [self.prev.ids[self.trusted : sync[0]], cur.ids[sync[1] :]]
        # from `base`, the whole rest has prev's tokens up to far past its trusted index
        return [self._ids(self.buffer)[self.trusted :]]

    def _advance(self) -> list[np.ndarray]:
        if self.prev is None:
            self.prev = self._tokenize(self.buffer[: self.window], self.base)
            return []
        start = self.base + self.stride
        cur = self._tokenize(self.buffer[self.stride : self.stride + self.window], start)
        sync = _sync_point(self.prev, self.trusted, cur)
        if sync is None:
            self.whole = True
            return []
        out = self.prev.ids[self.trusted : sync[0]]
        self.prev, self.trusted = cur, sync[1]
        self.buffer, self.base = self.buffer[self.stride :], start
        return [out]

    def _ids(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int32)

    def _tokenize(self, text: str, at: int) -> _Tokens:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2) + at
        return _Tokens(np.asarray(enc["input_ids"], dtype=np.int32), offsets[:, 0], offsets[:, 1])


def _sync_point(a: _Tokens, trusted: int, b: _Tokens) -> tuple[int, int] | None:
    """``(i, j)``: ``a``'s token ``i`` and ``b``'s token ``j`` start at the first offset (at or after
    ``b``'s start and ``a``'s token ``trusted``) where both have a token starting and the next
    :data:`AGREE` tokens agree; ``None`` if there is none."""
    if b.ids.size == 0 or trusted >= a.ids.size:
        return None
    lower = max(int(b.starts[0]), int(a.starts[trusted]))
    first_b = {}
    for j in range(int(np.searchsorted(b.starts, a.ends[-1], "right"))):  # b's first token at each offset
        first_b.setdefault(int(b.starts[j]), j)
    for i in range(max(trusted, int(np.searchsorted(a.starts, lower))), a.ids.size - AGREE + 1):
        start = int(a.starts[i])
        j = first_b.get(start)
        if j is None or (i > 0 and a.starts[i - 1] == start) or j + AGREE > b.ids.size:
            continue
        if all(np.array_equal(x[i : i + AGREE], y[j : j + AGREE]) for x, y in
               ((a.ids, b.ids), (a.starts, b.starts), (a.ends, b.ends))):
            return i, j
    return None


__all__ = ["WindowedTokenizer", "WINDOW_CHARS", "OVERLAP_CHARS"]
