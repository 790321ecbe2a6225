"""Corpus readers: a source string becomes an ordered stream of :class:`Document` (or of chat rows).

Supported sources (``open_corpus(source)``, or ``read_documents(source)`` for just the documents):

- ``builtin:pydoc`` — Python's own help topics (``pydoc_data.topics.topics``), one document per
  topic, sorted by topic key. Works offline; its text follows the running Python version.
- ``builtin:pydoc-chat`` — the same topics as conversations (a chat corpus, below), from
  :func:`logitcache.capture.chat.pydoc_chat_rows`.
- ``builtin:stdlib`` — the running Python's standard-library sources (:func:`stdlib_files`: every ``.py``
  file under ``sysconfig``'s ``stdlib`` path, sorted by relative path, one document each, without test
  packages, ``site-packages`` and the machine-generated ``_sysconfigdata*``/``config-*`` files: ~12 MB,
  some 3–4 million tokens on Python 3.11). Offline, larger than pydoc; which files it read is
  ``corpus.input`` (``python`` version, file count and ``files_sha256`` of the name list).
- plain text — a ``.txt``/``.md`` file. **One file is one document**: a file's whole text is a
  single document, however many blank lines or headings it holds, so an EOS token is placed only
  between files. A file larger than :data:`PIECE_BYTES` is a :class:`TextFileDocument`, read in
  pieces whenever it is iterated, never held whole.
- JSON Lines — a ``.jsonl`` or ``.json`` file with one JSON object per line; each object's
  ``text_field`` (a string) is one document. Blank lines are skipped.
- Parquet — a ``.parquet`` file; each row's ``text_field`` is one document.
- a directory, read by the rule of :mod:`logitcache.capture.sources`: data files of one kind, found
  recursively and sorted by relative path; documentation (README, LICENSE, a dataset card) and
  hidden files skipped and listed; mixed kinds refused. A glob (``data/*.jsonl``) names files exactly.
- a Hugging Face dataset written with ``save_to_disk`` — a directory holding ``dataset_info.json``
  and ``state.json`` (one ``Dataset``) or ``dataset_dict.json`` (a ``DatasetDict``, of which
  ``split`` is read); each row's ``text_field`` is one document.

Bytes are decoded as strict UTF-8: undecodable bytes raise :class:`CorpusError` naming the file and
byte offset, never get replaced silently. A UTF-8 byte-order mark (EF BB BF) at the start of a text or
JSON Lines file is dropped (counted in ``input.bom_stripped``); nothing else is changed: CRLF and CR
line ends are kept as the file has them and counted (``input.newlines``). Every ``Document.origin``
says where the text came from (``pydoc:if``, ``notes/a.txt``, ``data.jsonl:17``, ``part-0.parquet:3``,
``corpus[train]:42``).

**Chat corpora.** A JSON Lines, Parquet or saved-dataset corpus holds conversations instead of text
(:attr:`Corpus.chat`) when its rows have ``messages``, ``conversations`` or ``prompt``/``completion``
and no ``text_field``. This is decided when the corpus is opened: from the non-null keys of its first
non-blank JSON line, or from the columns of its first Parquet file or of the dataset. Its rows are read
with :meth:`Corpus.rows` as plain dicts (nulls kept as None; Parquet and dataset rows carry every
``text``/conversation column they have), and :func:`logitcache.capture.chat.conversation_from_row`
turns each into a conversation; :meth:`Corpus.check` does so for every row it reads, so a file mixing
row kinds fails before a teacher loads. :meth:`Corpus.documents` refuses a chat corpus and
:meth:`Corpus.rows` a text one.

JSON Lines, Parquet and saved datasets are read by :mod:`logitcache.capture.rowfiles`; decoding, the
byte-order mark and line-end counts are :mod:`logitcache.capture.textio`'s.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CorpusError
from .chat import conversation_from_row, pydoc_chat_rows, row_shape
from .rowfiles import RowReader, open_hf, open_jsonl, open_parquet
from .sources import CorpusFiles, resolve_files
from .textio import BOM, Document, TextFacts, decode_utf8, without_bom

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("builtin:pydoc", "builtin:pydoc-chat", "builtin:stdlib")
STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_CHAT_ROWS = "rows with 'messages', 'conversations' or 'prompt'/'completion'"
PRESCAN_BYTES = 16 << 20  # Corpus.check reads a corpus up to this size in full, a larger one to its first document
PIECE_BYTES = 1 << 20  # a larger text file is read in pieces of this many bytes (cut at a character boundary)


@dataclass(frozen=True)
class TextFileDocument:
    """A text file too large to hold: ``size`` UTF-8 bytes from byte ``start`` (after a dropped BOM) on.

    :meth:`pieces` reads it in pieces of about :data:`PIECE_BYTES`, decoded as strict UTF-8, each cut
    at a character boundary and never between a CR and its LF, and counts their line ends into ``facts``.
    """

    path: Path
    origin: str
    start: int
    size: int
    facts: TextFacts = field(compare=False, repr=False)

    def pieces(self) -> Iterator[str]:
        offset, rest = self.start, b""
        with self.path.open("rb") as handle:
            handle.seek(self.start)
            while block := handle.read(PIECE_BYTES):
                data = rest + block
                cut = _piece_end(data)
                rest = data[cut:]
                if cut:
                    yield self._decoded(data[:cut], offset)
                offset += cut
        if rest:
            yield self._decoded(rest, offset)  # a truncated last character fails to decode here
        if (read := offset + len(rest) - self.start) != self.size:
            raise CorpusError(f"{self.path}: {read} bytes read, expected {self.size} (the size when the corpus "
                              "was opened); the file changed during capture. Capture from a file that stays unchanged")

    def _decoded(self, data: bytes, offset: int) -> str:
        text = decode_utf8(data, str(self.path), offset)
        self.facts.count(text)
        return text


def _piece_end(data: bytes) -> int:
    """Where to cut ``data`` so that the last character (maybe incomplete) and a CR before it go to the next piece."""
    cut = len(data)
    while cut > max(0, len(data) - 4):
        cut -= 1
        if data[cut] & 0xC0 != 0x80:  # not a continuation byte: the last character starts here
            break
    else:
        cut = len(data)  # no character start in the last 4 bytes: invalid, and decoding says where
    return cut - 1 if cut and data[cut - 1] == 0x0D else cut


Reader = Callable[[TextFacts], Iterator[Document | TextFileDocument]]


class Corpus:
    """An opened corpus: checked for existence, kind and schema; :meth:`documents` (a text corpus) or
    :meth:`rows` (a chat corpus, ``chat`` True) reads it from the start.

    ``source`` is the canonical spelling (an absolute path, or the builtin's name), ``kind`` the data
    kind, ``names`` the files read (relative names), ``skipped`` the files the directory rule left out,
    ``text_field`` the field a JSON Lines, Parquet or dataset corpus was opened with.
    """

    def __init__(self, source: str, kind: str, read: Reader | RowReader, files: CorpusFiles | None = None, *,
                 chat: bool = False, text_field: str | None = None, about: dict | None = None) -> None:
        self.source, self.kind, self._read, self.chat, self.text_field = source, kind, read, chat, text_field
        self.about = about or {}
        self.names = tuple(name for _, name in files.files) if files and kind != "hf" else ()
        self.skipped = files.skipped if files else ()
        self.size = files.size if files else 0
        self.facts = TextFacts()

    def documents(self) -> Iterator[Document | TextFileDocument]:
        """Every document of a text corpus in order; :attr:`facts` counts this pass."""
        if self.chat:
            raise CorpusError(f"{self.source} holds conversations ({_CHAT_ROWS}), not text documents; read it "
                              "with Corpus.rows(), or pass --text-field naming a text field its rows have")
        return self._documents()

    def _documents(self) -> Iterator[Document | TextFileDocument]:
        facts = self.facts = TextFacts()
        for doc in self._read(facts):
            if isinstance(doc, Document):  # a TextFileDocument counts its pieces as they are read
                facts.count(doc.text)
            yield doc

    def rows(self) -> Iterator[tuple[str, dict]]:
        """Every row of a chat corpus in order, as ``(origin, row)``; :attr:`facts` counts this pass."""
        return ((origin, row) for _, origin, row in self._rows())

    def _rows(self) -> Iterator[tuple[str, str, dict]]:
        if not self.chat:
            field_hint = f" (read by its text field {self.text_field!r})" if self.text_field else ""
            raise CorpusError(f"{self.source} holds text documents{field_hint}, not conversations; read it with "
                              f"Corpus.documents(). A chat corpus has {_CHAT_ROWS} and no text field "
                              "(builtin:pydoc-chat is one)")
        self.facts = TextFacts()
        return self._read(self.facts)

    def check(self) -> None:
        """Fail before a teacher loads: read the whole corpus if it is at most :data:`PRESCAN_BYTES`
        (every line and row checked), else its first document or row; refuse a corpus without documents or
        text. A chat corpus's rows must each be a conversation, of one shape per file (chat.row_shape)."""
        limit = None if self.size <= PRESCAN_BYTES else 1
        if self.chat:
            return self._check_rows(limit)
        docs, read, texts = self.documents(), 0, 0
        for doc in docs:
            read, texts = read + 1, texts + any(not piece.isspace() for piece in doc.pieces())
            if read == limit:
                break
        docs.close()
        if not read:
            raise CorpusError(f"empty corpus: {self.source} yielded no documents; expected at least one. "
                              "Check the source")
        if limit is None and not texts:
            raise CorpusError(f"all {read} documents of {self.source} are empty or whitespace-only; expected "
                              "some text. Check --text-field and the source")

    def _check_rows(self, limit: int | None) -> None:
        rows, read, shapes = self._rows(), 0, {}
        for name, origin, row in rows:
            if name not in shapes:  # a file's first row sets the shape its other rows must have
                shapes[name] = row_shape(row, where=origin)
            conversation_from_row(row, where=origin, shape=shapes[name])
            read += 1
            if read == limit:
                break
        rows.close()
        if not read:
            raise CorpusError(f"empty corpus: {self.source} yielded no conversations; expected at least one. "
                              "Check the source")

    def manifest_input(self) -> dict:
        """What the manifest records of the last pass (``corpus.input``; shown by ``inspect``, never compared);
        a chat corpus adds ``"rows": "chat"`` (``newlines`` counts the line ends of text documents only)."""
        found = {"kind": self.kind, "files": list(self.names), "skipped": list(self.skipped),
                 "bom_stripped": self.facts.bom_stripped, "newlines": dict(self.facts.newlines), **self.about}
        return {**found, "rows": "chat"} if self.chat else found


def open_corpus(source: str, *, text_field: str = "text", split: str = "train") -> Corpus:
    """Open ``source`` (see the module docstring): everything but the documents' contents is checked now.

    ``text_field`` names the column/key holding text (JSONL, Parquet, HF datasets); ``split``
    picks the split of a saved ``DatasetDict``. Raises :class:`CorpusError` on unusable input.
    """
    if source.startswith(BUILTIN_PREFIX):
        if source not in BUILTINS:
            raise CorpusError(
                f"unknown builtin corpus {source!r}; expected one of {', '.join(BUILTINS)}"
            )
        if source == "builtin:pydoc-chat":
            return Corpus(source, "builtin", lambda facts: _read_pydoc_chat(), chat=True)
        if source == "builtin:stdlib":
            root, names = stdlib_files()
            about = {"python": platform.python_version(), "stdlib_files": len(names),
                     "files_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}
            return Corpus(source, "builtin", lambda facts: _read_stdlib(root, names, facts), about=about)
        return Corpus(source, "builtin", lambda facts: _read_pydoc())
    files = resolve_files(source)
    # one file named directly keeps the spelling given in origins and messages; directory files their names
    pairs = [(files.files[0][0], str(files.files[0][0]))] if Path(source).is_file() else list(files.files)
    if files.kind == "text":
        return Corpus(files.canonical, files.kind, lambda facts: _read_text_files(pairs, facts), files)
    if files.kind in ("jsonl", "json"):
        read, chat = open_jsonl(pairs, text_field)
    elif files.kind == "parquet":
        read, chat = open_parquet(pairs, text_field)
    else:
        read, chat = open_hf(files.files[0][0], text_field, split)
    return Corpus(files.canonical, files.kind, read, files, chat=chat, text_field=text_field)


def read_documents(source: str, *, text_field: str = "text",
                   split: str = "train") -> Iterator[Document | TextFileDocument]:
    """The documents of ``source`` in a deterministic order; the format is checked eagerly, before the
    first document is requested (:func:`open_corpus`)."""
    return open_corpus(source, text_field=text_field, split=split).documents()


def _read_pydoc() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Document(text=topics[key], origin=f"pydoc:{key}")


def stdlib_files() -> tuple[Path, list[str]]:
    """``(root, relative names)`` of ``builtin:stdlib``: the ``.py`` files under the running Python's
    ``sysconfig`` ``stdlib`` path, sorted, without :data:`STDLIB_SKIP` directories and machine-generated files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    keep = [n for n in names if not STDLIB_SKIP & set(n.split("/")) and not n.startswith(("_sysconfigdata", "config-"))]
    if not keep:
        raise CorpusError(f"builtin:stdlib found no .py files under {root} (sysconfig's stdlib path); expected "
                          "the Python standard library's sources. Use another corpus on this Python")
    return root, keep


def _read_stdlib(root: Path, names: list[str], facts: TextFacts) -> Iterator[Document]:
    for name in names:
        data, dropped = without_bom((root / name).read_bytes(), facts)
        yield Document(text=decode_utf8(data, str(root / name), dropped), origin=f"stdlib:{name}")


def _read_pydoc_chat() -> Iterator[tuple[str, str, dict]]:
    for origin, row in pydoc_chat_rows():
        yield "pydoc-chat", origin, row


def _read_text_files(files: list[tuple[Path, str]], facts: TextFacts) -> Iterator[Document | TextFileDocument]:
    """``files``: (path, origin name) pairs, already in reading order."""
    for file, name in files:
        size = file.stat().st_size
        if size <= PIECE_BYTES:
            data, dropped = without_bom(file.read_bytes(), facts)
            yield Document(text=decode_utf8(data, str(file), dropped), origin=name)
            continue
        with file.open("rb") as handle:
            _, dropped = without_bom(handle.read(len(BOM)), facts)
        yield TextFileDocument(file, name, dropped, size - dropped, facts)


__all__ = ["BUILTINS", "Corpus", "Document", "TextFileDocument", "open_corpus", "read_documents"]
