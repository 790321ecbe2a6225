"""Row files: JSON Lines, Parquet and saved Hugging Face datasets, read as text or as conversations.

Each ``open_*`` function checks what can be checked before a row is read (Parquet schemas, the saved
dataset's split and columns) and returns a reader and whether the corpus holds conversations
(:data:`CHAT_KEYS` and no text field, by the rule in :mod:`logitcache.capture.corpus`). A text reader
yields one :class:`~logitcache.capture.textio.Document` per row (its text field); a chat reader yields
``(file name, origin, row)`` with the row as a plain dict.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path

from ..errors import CorpusError
from .textio import Document, TextFacts, decode_utf8, without_bom

CHAT_KEYS = ("messages", "conversations", "prompt", "completion")  # the conversation fields of chat.row_shape
_ROW_KEYS = ("text", *CHAT_KEYS)  # the columns a Parquet/dataset chat row is read with: all row_shape looks at
_BATCH_ROWS = 1024
DocReader = Callable[[TextFacts], Iterator[Document]]
RowReader = Callable[[TextFacts], Iterator[tuple[str, str, dict]]]  # (file name, origin, row) of a chat corpus
Opened = tuple[DocReader | RowReader, bool]  # a reader, and whether it reads conversations


def _present_keys(record: object) -> list[str]:
    """The keys of a JSON object whose value is not null (a null field counts as absent, as in chat.row_shape)."""
    return [key for key, value in record.items() if value is not None] if isinstance(record, dict) else []


def _holds_chat(keys: Sequence[str], text_field: str) -> bool:
    """Whether a row (its non-null keys) or a schema (its columns) holds conversations: a conversation field
    and no ``text_field``."""
    return text_field not in keys and any(key in keys for key in CHAT_KEYS)


def open_jsonl(files: list[tuple[Path, str]], text_field: str) -> Opened:
    """The reader of a JSON Lines corpus, and whether it holds conversations (its first non-blank line's keys)."""
    lines = _jsonl_records(files, TextFacts())
    first = next(lines, None)
    lines.close()
    if first is not None and _holds_chat(_present_keys(first[-1]), text_field):
        return (lambda facts: _read_jsonl_rows(files, facts)), True
    return (lambda facts: _read_jsonl_files(files, text_field, facts)), False


def _read_jsonl_files(files: list[tuple[Path, str]], text_field: str, facts: TextFacts) -> Iterator[Document]:
    for _, where, origin, record in _jsonl_records(files, facts):
        yield Document(text=_field_of(record, text_field, where), origin=origin)


def _read_jsonl_rows(files: list[tuple[Path, str]], facts: TextFacts) -> Iterator[tuple[str, str, dict]]:
    expected = "a 'messages', 'conversations' or 'prompt'/'completion' field"
    for name, where, origin, record in _jsonl_records(files, facts):
        yield name, origin, _json_object(record, where, expected)


def _jsonl_records(files: list[tuple[Path, str]], facts: TextFacts) -> Iterator[tuple[str, str, str, object]]:
    """``(file name, where, origin, value)`` of every non-blank line of ``files``, parsed as JSON."""
    for path, name in files:
        hint = " (a .json corpus must be JSON Lines: one object per line)" if path.suffix.lower() == ".json" else ""
        offset = 0
        with path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                where = f"{path}:{lineno}"
                data, dropped = without_bom(raw, facts) if lineno == 1 else (raw, 0)
                line = decode_utf8(data, f"{path} line {lineno}", offset + dropped)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{where}: line is not valid JSON ({exc.msg}); expected one JSON object per "
                                      f"line{hint}") from exc
                yield name, where, f"{name}:{lineno}", record


def _json_object(record: object, where: str, expected: str) -> dict:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: found a JSON {type(record).__name__}, expected an object with {expected}")
    return record


def _field_of(record: object, text_field: str, where: str) -> str:
    record = _json_object(record, where, f"a {text_field!r} key")
    if text_field not in record:
        if _holds_chat(present := _present_keys(record), text_field):
            raise CorpusError(f"{where}: line holds a conversation ({', '.join(map(repr, present))}) but earlier "
                              f"lines are text ({text_field!r}); expected one kind of row per file. Put text and "
                              "conversations in separate files")
        keys = ", ".join(map(repr, record)) or "none"
        raise CorpusError(
            f"{where}: object has no {text_field!r} key (keys: {keys}); pass the right --text-field"
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {text_field!r} is a {type(value).__name__}, expected a string")
    return value


def open_parquet(files: list[tuple[Path, str]], text_field: str) -> Opened:
    """The reader of a Parquet corpus, and whether it holds conversations (the first file's columns); every
    file's schema is checked before any row is read."""
    if not _holds_chat(_parquet_schema(files[0][0]).names, text_field):
        for file, _ in files:
            _check_column(_parquet_schema(file), text_field, str(file))
        return (lambda facts: _iter_parquet_rows(files, text_field)), False
    columns = [_chat_columns(_parquet_schema(file).names, str(file), files[0][1]) for file, _ in files]
    return (lambda facts: _iter_parquet_chat_rows(files, columns)), True


def _parquet_schema(file: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(file)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-Parquet bytes
        raise CorpusError(f"{file}: cannot be read as Parquet ({exc}); expected a Parquet file") from exc


def _chat_columns(names: Sequence[str], where: str, first: str) -> list[str]:
    """The columns a chat row of ``where`` is read with; refuses a file without a conversation column."""
    if not any(key in names for key in CHAT_KEYS):
        raise CorpusError(f"{where}: no 'messages', 'conversations', 'prompt' or 'completion' column (it has columns "
                          f"{', '.join(map(repr, names))}), but {first} holds conversations; expected one kind of "
                          "rows in a corpus. Pass one file, or a glob naming the chat files")
    return [key for key in _ROW_KEYS if key in names]


def _iter_parquet_chat_rows(files: list[tuple[Path, str]], columns: list[list[str]]) -> Iterator[tuple[str, str, dict]]:
    import pyarrow.parquet as pq

    for (file, name), names in zip(files, columns):
        yield from _numbered(name, pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS, columns=names))


def _numbered(name: str, batches) -> Iterator[tuple[str, str, dict]]:
    """``(name, "name:i", row)`` for the rows of Arrow record batches or tables, numbered from 0, as dicts."""
    for row, record in enumerate(chain.from_iterable(batch.to_pylist() for batch in batches)):
        yield name, f"{name}:{row}", record


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


def open_hf(path: Path, text_field: str, split: str) -> Opened:
    """The reader of a saved dataset's ``split``, and whether it holds conversations (its columns)."""
    dataset, where = _load_hf_split(path, split)
    if _holds_chat(dataset.column_names, text_field):
        chats = dataset.select_columns([key for key in _ROW_KEYS if key in dataset.column_names])
        # rows as Arrow holds them (plain lists and dicts, nulls as None), not decoded by the dataset's features
        return (lambda facts: _numbered(where, chats.with_format("arrow").iter(batch_size=_BATCH_ROWS))), True
    _check_column(dataset.data.schema, text_field, where)
    texts = dataset.select_columns([text_field])
    return (lambda facts: _iter_hf_rows(texts, text_field, where)), False


def _load_hf_split(path: Path, split: str):
    """The saved dataset's ``split``, and the name its rows' origins carry."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise CorpusError(
                f"{path}: dataset has no split {split!r}; it has splits "
                f"{', '.join(map(repr, loaded))}. Pass the right --split"
            )
        loaded = loaded[split]
    return loaded, f"{path}[{split}]"


def _iter_hf_rows(dataset, text_field: str, where: str) -> Iterator[Document]:
    row = 0
    for batch in dataset.iter(batch_size=_BATCH_ROWS):
        for value in batch[text_field]:
            yield Document(text=_non_null(value, f"{where}:{row}", text_field), origin=f"{where}:{row}")
            row += 1


__all__ = ["CHAT_KEYS", "DocReader", "Opened", "RowReader", "open_hf", "open_jsonl", "open_parquet"]
