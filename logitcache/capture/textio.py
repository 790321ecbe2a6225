"""Text as found: the :class:`Document` value, strict UTF-8 decoding, the byte-order mark and line ends.

Shared by the corpus readers (:mod:`logitcache.capture.corpus`) and the row-file readers
(:mod:`logitcache.capture.rowfiles`); the rules are the corpus module's ("Bytes are decoded as strict UTF-8").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import CorpusError

BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Document:
    """One document: its full ``text`` and an ``origin`` naming where it came from."""

    text: str
    origin: str

    def pieces(self) -> Iterator[str]:
        """The text as non-empty pieces (here: one)."""
        if self.text:
            yield self.text


@dataclass
class TextFacts:
    """What one pass over a corpus found in its text: files whose BOM was dropped, line ends by kind."""

    bom_stripped: int = 0
    newlines: dict[str, int] = field(default_factory=lambda: {"lf": 0, "crlf": 0, "cr": 0})

    def count(self, text: str) -> None:
        crlf = text.count("\r\n")
        self.newlines["crlf"] += crlf
        self.newlines["lf"] += text.count("\n") - crlf
        self.newlines["cr"] += text.count("\r") - crlf


def decode_utf8(data: bytes | memoryview, where: str, base_offset: int = 0) -> str:
    """Strict UTF-8 decoding; the error names ``where`` and the absolute byte offset."""
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        offset = base_offset + exc.start
        utf16 = " (it starts with a UTF-16 byte-order mark: the file is UTF-16)" if (
            offset == 0 and data[:2] in (b"\xff\xfe", b"\xfe\xff")) else ""
        raise CorpusError(
            f"{where}: byte {data[exc.start]:#04x} at byte offset {offset} is not valid UTF-8{utf16}; "
            "expected UTF-8 text. Re-encode the file as UTF-8 (e.g. iconv -t UTF-8)"
        ) from exc


def without_bom(data: bytes, facts: TextFacts) -> tuple[bytes | memoryview, int]:
    """``data`` without a leading UTF-8 byte-order mark (a view: no copy), and how many bytes were dropped."""
    if not data.startswith(BOM):
        return data, 0
    facts.bom_stripped += 1
    return memoryview(data)[len(BOM):], len(BOM)


__all__ = ["BOM", "Document", "TextFacts", "decode_utf8", "without_bom"]
