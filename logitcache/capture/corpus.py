"""Corpus readers: a source string becomes an ordered stream of :class:`Document`.

Supported sources (``open_corpus(source)``, or ``read_documents(source)`` for just the documents):

- ``builtin:pydoc`` — Python's own help topics (``pydoc_data.topics.topics``), one document per
  topic, sorted by topic key. Works offline; its text follows the running Python version.
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
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CorpusError
from .sources import CorpusFiles, resolve_files

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("builtin:pydoc",)
BOM = b"\xef\xbb\xbf"
PRESCAN_BYTES = 16 << 20  # Corpus.check reads a corpus up to this size in full, a larger one to its first document
PIECE_BYTES = 1 << 20  # a larger text file is read in pieces of this many bytes (cut at a character boundary)
_BATCH_ROWS = 1024


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
        text = _decode(data, str(self.path), offset)
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
    """An opened corpus: checked for existence, kind and schema; :meth:`documents` reads it from the start.

    ``source`` is the canonical spelling (an absolute path, or the builtin's name), ``kind`` the data
    kind, ``names`` the files read (relative names), ``skipped`` the files the directory rule left out.
    """

    def __init__(self, source: str, kind: str, read: Reader, files: CorpusFiles | None = None) -> None:
        self.source, self.kind, self._read = source, kind, read
        self.names = tuple(name for _, name in files.files) if files and kind != "hf" else ()
        self.skipped = files.skipped if files else ()
        self.size = files.size if files else 0
        self.facts = TextFacts()

    def documents(self) -> Iterator[Document | TextFileDocument]:
        """Every document in order; :attr:`facts` counts this pass."""
        facts = self.facts = TextFacts()
        for doc in self._read(facts):
            if isinstance(doc, Document):  # a TextFileDocument counts its pieces as they are read
                facts.count(doc.text)
            yield doc

    def check(self) -> None:
        """Fail before a teacher loads: read the whole corpus if it is at most :data:`PRESCAN_BYTES`
        (every line and row checked), else its first document; refuse a corpus without documents or text."""
        limit = None if self.size <= PRESCAN_BYTES else 1
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

    def manifest_input(self) -> dict:
        """What the manifest records of the last pass (``corpus.input``; shown by ``inspect``, never compared)."""
        return {"kind": self.kind, "files": list(self.names), "skipped": list(self.skipped),
                "bom_stripped": self.facts.bom_stripped, "newlines": dict(self.facts.newlines)}


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
        return Corpus(source, "builtin", lambda facts: _read_pydoc())
    files = resolve_files(source)
    # one file named directly keeps the spelling given in origins and messages; directory files their names
    pairs = [(files.files[0][0], str(files.files[0][0]))] if Path(source).is_file() else list(files.files)
    if files.kind == "text":
        read = lambda facts: _read_text_files(pairs, facts)  # noqa: E731
    elif files.kind in ("jsonl", "json"):
        read = lambda facts: _read_jsonl_files(pairs, text_field, facts)  # noqa: E731
    elif files.kind == "parquet":
        _check_parquet_files(pairs, text_field)
        read = lambda facts: _iter_parquet_rows(pairs, text_field)  # noqa: E731
    else:
        dataset, where = _load_hf_dataset(files.files[0][0], text_field, split)
        read = lambda facts: _iter_hf_rows(dataset, text_field, where)  # noqa: E731
    return Corpus(files.canonical, files.kind, read, files)


def read_documents(source: str, *, text_field: str = "text",
                   split: str = "train") -> Iterator[Document | TextFileDocument]:
    """The documents of ``source`` in a deterministic order; the format is checked eagerly, before the
    first document is requested (:func:`open_corpus`)."""
    return open_corpus(source, text_field=text_field, split=split).documents()


def _read_pydoc() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Document(text=topics[key], origin=f"pydoc:{key}")


def _decode(data: bytes | memoryview, where: str, base_offset: int = 0) -> str:
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


def _without_bom(data: bytes, facts: TextFacts) -> tuple[bytes | memoryview, int]:
    """``data`` without a leading UTF-8 byte-order mark (a view: no copy), and how many bytes were dropped."""
    if not data.startswith(BOM):
        return data, 0
    facts.bom_stripped += 1
    return memoryview(data)[len(BOM):], len(BOM)


def _read_text_files(files: list[tuple[Path, str]], facts: TextFacts) -> Iterator[Document | TextFileDocument]:
    """``files``: (path, origin name) pairs, already in reading order."""
    for file, name in files:
        size = file.stat().st_size
        if size <= PIECE_BYTES:
            data, dropped = _without_bom(file.read_bytes(), facts)
            yield Document(text=_decode(data, str(file), dropped), origin=name)
            continue
        with file.open("rb") as handle:
            _, dropped = _without_bom(handle.read(len(BOM)), facts)
        yield TextFileDocument(file, name, dropped, size - dropped, facts)


def _read_jsonl_files(files: list[tuple[Path, str]], text_field: str, facts: TextFacts) -> Iterator[Document]:
    for file, name in files:
        yield from _read_jsonl(file, name, text_field, facts)


def _read_jsonl(path: Path, name: str, text_field: str, facts: TextFacts) -> Iterator[Document]:
    hint = " (a .json corpus must be JSON Lines: one object per line)" if path.suffix.lower() == ".json" else ""
    offset = 0
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            data, dropped = _without_bom(raw, facts) if lineno == 1 else (raw, 0)
            line = _decode(data, f"{path} line {lineno}", offset + dropped)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{where}: line is not valid JSON ({exc.msg}); expected one JSON object per line{hint}") from exc
            yield Document(text=_field_of(record, text_field, where), origin=f"{name}:{lineno}")


def _field_of(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: found a JSON {type(record).__name__}, expected an object with a {text_field!r} key")
    if text_field not in record:
        keys = ", ".join(map(repr, record)) or "none"
        raise CorpusError(
            f"{where}: object has no {text_field!r} key (keys: {keys}); pass the right --text-field"
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {text_field!r} is a {type(value).__name__}, expected a string")
    return value


def _check_parquet_files(files: list[tuple[Path, str]], text_field: str) -> None:
    """Every file's schema, checked before any row is read."""
    import pyarrow.parquet as pq

    for file, _ in files:
        try:
            schema = pq.read_schema(file)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-Parquet bytes
            raise CorpusError(f"{file}: cannot be read as Parquet ({exc}); expected a Parquet file") from exc
        _check_column(schema, text_field, str(file))


def _iter_parquet_rows(files: list[tuple[Path, str]], text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    for file, name in files:
        row = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield Document(text=_non_null(value, f"{name}:{row}", text_field), origin=f"{name}:{row}")
                row += 1


def _check_column(schema, text_field: str, where: str) -> None:
    import pyarrow as pa

    if text_field not in schema.names:
        raise CorpusError(
            f"{where}: no column {text_field!r}; it has columns {', '.join(map(repr, schema.names))}. "
            "Pass the right --text-field"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise CorpusError(f"{where}: column {text_field!r} has type {kind}, expected a string column")


def _non_null(value: str | None, where: str, text_field: str) -> str:
    if value is None:
        raise CorpusError(f"{where}: {text_field!r} is null, expected a string. Drop or fill null rows")
    return value


def _load_hf_dataset(path: Path, text_field: str, split: str):
    """The saved dataset's ``split``, its text column checked, and the name its rows' origins carry."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise CorpusError(
                f"{path}: dataset has no split {split!r}; it has splits "
                f"{', '.join(map(repr, loaded))}. Pass the right --split"
            )
        loaded = loaded[split]
    where = f"{path}[{split}]"
    _check_column(loaded.data.schema, text_field, where)
    return loaded.select_columns([text_field]), where


def _iter_hf_rows(dataset, text_field: str, where: str) -> Iterator[Document]:
    row = 0
    for batch in dataset.iter(batch_size=_BATCH_ROWS):
        for value in batch[text_field]:
            yield Document(text=_non_null(value, f"{where}:{row}", text_field), origin=f"{where}:{row}")
            row += 1


__all__ = ["BUILTINS", "Corpus", "Document", "TextFileDocument", "open_corpus", "read_documents"]
