"""Corpus readers: a source string becomes an ordered stream of :class:`Document`.

Supported sources (``read_documents(source)``):

- ``builtin:pydoc`` — Python's own help topics (``pydoc_data.topics.topics``), one document per
  topic, sorted by topic key. Works offline; its text follows the running Python version.
- plain text — a ``.txt``/``.md`` file, or a directory searched recursively for ``*.txt`` and
  ``*.md`` files, sorted by their path relative to the directory. **One file is one document**:
  a file's whole text is a single document, however many blank lines or headings it holds, so an
  EOS token is placed only between files.
- JSON Lines — a ``.jsonl`` or ``.json`` file with one JSON object per line; each object's
  ``text_field`` (a string) is one document. Blank lines are skipped.
- Parquet — a ``.parquet`` file, or a directory of them (recursive, sorted by relative path);
  each row's ``text_field`` is one document.
- a Hugging Face dataset written with ``save_to_disk`` — a directory holding ``dataset_info.json``
  and ``state.json`` (one ``Dataset``) or ``dataset_dict.json`` (a ``DatasetDict``, of which
  ``split`` is read); each row's ``text_field`` is one document.

Bytes are decoded as strict UTF-8: undecodable bytes raise :class:`CorpusError` naming the file and
byte offset, never get replaced silently. Every ``Document.origin`` says where the text came from
(``pydoc:if``, ``notes/a.txt``, ``data.jsonl:17``, ``part-0.parquet:3``, ``corpus[train]:42``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorpusError

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("builtin:pydoc",)
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
SUPPORTED = (
    "builtin:pydoc; a .txt/.md file or a directory of them; a .jsonl/.json (JSON Lines) file; "
    "a .parquet file or a directory of them; a Hugging Face dataset directory written by save_to_disk"
)
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Document:
    """One document: its full ``text`` and an ``origin`` naming where it came from."""

    text: str
    origin: str


def read_documents(source: str, *, text_field: str = "text", split: str = "train") -> Iterator[Document]:
    """Yield the documents of ``source`` in a deterministic order (see the module docstring).

    ``text_field`` names the column/key holding text (JSONL, Parquet, HF datasets); ``split``
    picks the split of a saved ``DatasetDict``. Raises :class:`CorpusError` on unusable input.
    The format is checked eagerly, before the first document is requested.
    """
    if source.startswith(BUILTIN_PREFIX):
        if source not in BUILTINS:
            raise CorpusError(
                f"unknown builtin corpus {source!r}; expected one of {', '.join(BUILTINS)}"
            )
        return _read_pydoc()
    path = Path(source)
    if not path.exists():
        raise CorpusError(
            f"corpus path {source!r} does not exist; expected a file or directory "
            f"(supported: {SUPPORTED}). Check the path, or use builtin:pydoc"
        )
    if path.is_dir():
        return _read_directory(path, text_field=text_field, split=split)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _read_text_files([(path, str(path))])
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, text_field)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet_files([(path, str(path))], text_field)
    raise CorpusError(
        f"unknown corpus format for {source!r} (suffix {suffix or 'none'!r}); supported: {SUPPORTED}. "
        "Rename the file to a supported suffix or convert it"
    )


def _read_pydoc() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield Document(text=topics[key], origin=f"pydoc:{key}")


def _read_directory(path: Path, *, text_field: str, split: str) -> Iterator[Document]:
    if any((path / marker).is_file() for marker in HF_MARKERS):
        return _read_hf_dataset(path, text_field, split)
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    texts = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    parquets = [p for p in files if p.suffix.lower() in PARQUET_SUFFIXES]
    if texts and parquets:
        raise CorpusError(
            f"directory {str(path)!r} holds both text files ({len(texts)}) and Parquet files "
            f"({len(parquets)}); expected one kind. Point at a single file or split the directory"
        )
    if parquets:
        return _read_parquet_files([(p, p.relative_to(path).as_posix()) for p in parquets], text_field)
    if texts:
        return _read_text_files([(p, p.relative_to(path).as_posix()) for p in texts])
    raise CorpusError(
        f"directory {str(path)!r} holds no corpus files ({len(files)} other files); expected *.txt/*.md, "
        f"*.parquet, or a Hugging Face dataset saved with save_to_disk (dataset_info.json or "
        f"dataset_dict.json). Supported: {SUPPORTED}"
    )


def _decode(data: bytes, where: str, base_offset: int = 0) -> str:
    """Strict UTF-8 decoding; the error names ``where`` and the absolute byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = base_offset + exc.start
        raise CorpusError(
            f"{where}: byte {data[exc.start]:#04x} at byte offset {offset} is not valid UTF-8; "
            "expected UTF-8 text. Re-encode the file as UTF-8 (e.g. iconv -t UTF-8)"
        ) from exc


def _read_text_files(files: list[tuple[Path, str]]) -> Iterator[Document]:
    """``files``: (path, origin name) pairs, already in reading order."""
    for file, name in files:
        yield Document(text=_decode(file.read_bytes(), str(file)), origin=name)


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    hint = " (a .json corpus must be JSON Lines: one object per line)" if path.suffix.lower() == ".json" else ""
    offset = 0
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, f"{path} line {lineno}", offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{where}: line is not valid JSON ({exc.msg}); expected one JSON object per line{hint}") from exc
            yield Document(text=_field_of(record, text_field, where), origin=where)


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


def _read_parquet_files(files: list[tuple[Path, str]], text_field: str) -> Iterator[Document]:
    """``files``: (path, origin name) pairs. Every schema is checked now, before any row is read."""
    import pyarrow.parquet as pq

    for file, _ in files:
        try:
            schema = pq.read_schema(file)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-Parquet bytes
            raise CorpusError(f"{file}: cannot be read as Parquet ({exc}); expected a Parquet file") from exc
        _check_column(schema, text_field, str(file))
    return _iter_parquet_rows(files, text_field)


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


def _read_hf_dataset(path: Path, text_field: str, split: str) -> Iterator[Document]:
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
    return _iter_hf_rows(loaded.select_columns([text_field]), text_field, where)


def _iter_hf_rows(dataset, text_field: str, where: str) -> Iterator[Document]:
    row = 0
    for batch in dataset.iter(batch_size=_BATCH_ROWS):
        for value in batch[text_field]:
            yield Document(text=_non_null(value, f"{where}:{row}", text_field), origin=f"{where}:{row}")
            row += 1


__all__ = ["BUILTINS", "Document", "read_documents"]
