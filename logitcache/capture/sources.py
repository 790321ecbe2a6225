"""Which files a corpus path names: a file, a directory (by the rule below) or a glob.

The directory rule (docs/capture.md, "Corpora"):

1. A directory holding ``dataset_info.json``/``state.json`` or ``dataset_dict.json`` is a Hugging Face
   dataset written by ``save_to_disk`` and is read as one.
2. Otherwise every file below it is looked at, recursively, sorted by its path relative to the
   directory. Skipped, and listed: hidden files and folders (a name starting with ``.``);
   documentation (``README*``, ``LICENSE*``/``LICENCE*``, ``COPYING*``, ``NOTICE*``, ``CHANGELOG*``,
   ``CITATION*``, and ``*.md`` unless the data is text); files of no data kind (``.py``, ``.yaml``,
   ``.jsonl.gz``, ...).
3. The rest are data files, by kind: text (``.txt``, ``.md``), jsonl (``.jsonl``), json (``.json``,
   read as JSON Lines), parquet (``.parquet``). They must all be of one kind; more than one kind is
   refused, naming the kinds and files, and asking for one file or a glob.

A glob (``data/*.jsonl``, ``'**'`` recursive) names its matches exactly: nothing is skipped, and they
too must be of one data kind. Names (``CorpusFiles.files``) are relative to the directory, or to the
glob's folder, or (one file) the file's name.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorpusError

KINDS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
DOC_NAMES = re.compile(r"(readme|license|licence|copying|notice|changelog|citation)([.-].*)?", re.IGNORECASE)
SUPPORTED = (
    "builtin:pydoc, builtin:pydoc-chat, builtin:stdlib; a .txt/.md file; a .jsonl/.json (JSON Lines) file; "
    "a .parquet file; a directory of one kind of these (README, LICENSE and other documentation skipped); a glob such as "
    "'data/*.jsonl'; a Hugging Face dataset directory written by save_to_disk"
)
_SHOWN = 3  # files named per kind in a message


@dataclass(frozen=True)
class CorpusFiles:
    """A path source resolved: ``kind`` (text, jsonl, json, parquet or hf), the data ``files`` in reading
    order as (path, name) pairs, the files the directory rule ``skipped`` (``"name (why)"``) and the
    ``canonical`` spelling of the source (absolute, symlinks resolved) for display."""

    kind: str
    files: tuple[tuple[Path, str], ...]
    skipped: tuple[str, ...]
    canonical: str

    @property
    def size(self) -> int:
        """Bytes of the data files (of the whole directory for a saved HF dataset)."""
        paths = [p for p in self.files[0][0].rglob("*") if p.is_file()] if self.kind == "hf" else \
            [p for p, _ in self.files]
        return sum(p.stat().st_size for p in paths)


def resolve_files(source: str) -> CorpusFiles:
    """The files ``source`` (a path or a glob) names, by the rule in the module docstring."""
    path = Path(source)
    if not path.exists() and glob.has_magic(source):
        return _glob_files(source)
    if not path.exists():
        raise CorpusError(
            f"corpus path {source!r} does not exist; expected a file, a directory or a glob "
            f"(supported: {SUPPORTED}). Check the path, or use builtin:pydoc"
        )
    canonical = str(path.resolve())
    if path.is_dir():
        if any((path / marker).is_file() for marker in HF_MARKERS):
            return CorpusFiles("hf", ((path, "."),), (), canonical)
        return _directory_files(path, canonical)
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise CorpusError(
            f"unknown corpus format for {source!r} (suffix {path.suffix.lower() or 'none'!r}); supported: "
            f"{SUPPORTED}. Rename the file to a supported suffix or convert it"
        )
    return CorpusFiles(kind, ((path, path.name),), (), canonical)


def _directory_files(root: Path, canonical: str) -> CorpusFiles:
    entries = sorted(((p, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file()),
                     key=lambda e: e[1])
    data, skipped = [], []
    for path, name in entries:
        why = _skip_reason(name)
        (skipped.append(f"{name} ({why})") if why else data.append((path, name)))
    if any(KINDS[Path(n).suffix.lower()] != "text" for _, n in data):  # then Markdown is the data's card
        skipped += [f"{n} (documentation)" for _, n in data if n.lower().endswith(".md")]
        data = [(p, n) for p, n in data if not n.lower().endswith(".md")]
    skipped.sort()
    if not data:
        listed = "; skipped: " + ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "") if skipped else ""
        raise CorpusError(
            f"directory {str(root)!r} holds no corpus files ({len(entries)} files{listed}); expected *.txt/*.md, "
            f"*.jsonl, *.json, *.parquet, or a Hugging Face dataset saved with save_to_disk (dataset_info.json "
            f"or dataset_dict.json). Supported: {SUPPORTED}"
        )
    return CorpusFiles(_one_kind(data, f"directory {str(root)!r}", str(root)), tuple(data), tuple(skipped),
                       canonical)


def _skip_reason(name: str) -> str | None:
    """Why the directory rule skips ``name`` (a path relative to the directory), or None for a data file."""
    if any(part.startswith(".") for part in name.split("/")):
        return "hidden"
    base = name.rsplit("/", 1)[-1]
    if DOC_NAMES.fullmatch(base):
        return "documentation"
    suffix = Path(base).suffix.lower()
    return None if suffix in KINDS else f"not a corpus file: suffix {suffix or 'none'!r}"


def _glob_files(pattern: str) -> CorpusFiles:
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not matches:
        raise CorpusError(f"corpus glob {pattern!r} matches no file; expected at least one. Check the pattern "
                          "(quote it so the shell leaves it alone)")
    files = [(p, p.relative_to(base).as_posix()) for p in matches]
    other = [n for p, n in files if p.suffix.lower() not in KINDS]
    if other:
        raise CorpusError(f"corpus glob {pattern!r} matches {len(other)} files of no corpus kind "
                          f"({', '.join(other[:_SHOWN])}); expected only {', '.join(sorted(KINDS))} files. "
                          "Narrow the pattern, e.g. 'data/*.jsonl'")
    canonical = str(Path(base.resolve(), *parts[fixed:]))
    return CorpusFiles(_one_kind(files, f"corpus glob {pattern!r}", str(base)), tuple(files), (), canonical)


def _one_kind(files: list[tuple[Path, str]], what: str, folder: str) -> str:
    """The one data kind of ``files``; refuses several, naming each kind with its count and first files."""
    by_kind: dict[str, list[str]] = {}
    for path, name in files:
        by_kind.setdefault(KINDS[path.suffix.lower()], []).append(name)
    if len(by_kind) == 1:
        return next(iter(by_kind))
    found = "; ".join(f"{kind} ({len(names)}: {', '.join(names[:_SHOWN])}{', ...' * (len(names) > _SHOWN)})"
                      for kind, names in sorted(by_kind.items()))
    largest = max(by_kind, key=lambda k: len(by_kind[k]))
    suffix = next(s for s, k in KINDS.items() if k == largest)
    raise CorpusError(
        f"{what} holds data files of {len(by_kind)} kinds: {found}; expected one kind. Pass one file, or a glob "
        f"naming the files to read, e.g. --corpus '{folder}/**/*{suffix}'"
    )


__all__ = ["CorpusFiles", "HF_MARKERS", "KINDS", "SUPPORTED", "resolve_files"]
