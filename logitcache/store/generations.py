"""Read side of a store of teacher-generated responses: each row's prompt, response and finish reason.

A generated store is a ``documents`` store whose manifest holds ``corpus.layout.generate`` (the settings)
and whose rows carry a ``finish_reason`` column (docs/format.md, "Generated responses"). A row's
response is its trained part: tokens ``prompt_length ..`` where ``prompt_length`` is one past the first
trained position. Nothing here decodes targets; :func:`logitcache.capture.export.iter_generated` reads a
whole store, ``inspect`` summarises one (:func:`summarize`) from the counts each unit's record keeps
(:class:`~logitcache.store.records.GenerationCounts`, written at commit by :func:`committed_counts`; the
rows of a unit whose record predates them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptShardError, StoreError
from .row_decode import row_mask
from .finish import FINISH_CODES, finish_code, row_finish
from .records import GenerationCounts, ShardRecord
from .spec import ShardSpec
from .units import UnitRows


@dataclass(frozen=True)
class GeneratedRow:
    """One stored response: ``index`` (the plan's sequence index), ``tokens int32[L]`` (prompt + response),
    ``prompt_length`` and the finish reason (``stop_string``: the index into the settings' ``stop``)."""

    index: int
    seq_id: int
    tokens: np.ndarray
    prompt_length: int
    finish: str
    stop_string: int | None

    @property
    def response(self) -> np.ndarray:
        return self.tokens[self.prompt_length:]


def prompt_length(mask: np.ndarray) -> int:
    """A generated row's prompt tokens: one past its first trained position (its train mask ``bool[L - 1]``)."""
    return int(np.argmax(np.asarray(mask))) + 1


def unit_rows(spec: ShardSpec, index: int, unit: UnitRows, stop_strings: int) -> Iterator[GeneratedRow]:
    """The responses of unit ``index`` (its rows as :func:`~logitcache.store.reader.read_unit` gives them);
    ``stop_strings``: how many the settings list (a finish code naming another is a CorruptShardError)."""
    if not spec.generated:
        raise StoreError("this store holds no teacher-generated responses (its manifest has no corpus.layout."
                         "generate); expected a store captured with --generate-max-new-tokens")
    for r in range(len(unit)):
        columns = unit.row(r)
        tokens = columns["tokens"].view("<i4").astype(np.int32)
        finish, stop_string = row_finish(columns, stop_strings)
        yield GeneratedRow(index * spec.sequences_per_shard + r, int(unit.seq_ids[r]), tokens,
                           prompt_length(row_mask(columns)), finish, stop_string)


def count_responses(responses: Iterable[tuple[int, int]]) -> GenerationCounts:
    """The :class:`GenerationCounts` of ``(response tokens, finish code)`` pairs, one per row."""
    lengths, codes = [], []
    for length, code in responses:
        lengths.append(length)
        codes.append(code)
    return GenerationCounts(sum(lengths), max(lengths, default=0),
                            tuple(int(n) for n in np.bincount(np.asarray(codes, dtype=np.int64), minlength=1)))


def committed_counts(tokens: list, masks: list[np.ndarray], finish: list[int]) -> GenerationCounts:
    """What a generated unit's record keeps (at commit): its rows' response lengths and finish codes."""
    return count_responses((len(tok) - prompt_length(mask), code) for tok, mask, code in zip(tokens, masks, finish))


def read_counts(rows: Iterable[GeneratedRow]) -> GenerationCounts:
    """The :class:`GenerationCounts` of stored responses (what a unit's record keeps, from its rows)."""
    return count_responses((row.response.size, finish_code(row.finish, row.stop_string)) for row in rows)


def recorded_counts(record: ShardRecord, stop_strings: int) -> GenerationCounts | None:
    """``record.generation`` (None in a store written before it), refused when it counts responses ended by a
    stop string the settings do not list."""
    counts, first = record.generation, FINISH_CODES["stop-string"]
    named = [] if counts is None else [c for c, n in enumerate(counts.finish_codes) if n and c >= first + stop_strings]
    if named:
        raise CorruptShardError(f"shard {record.index}: its record counts {counts.finish_codes[named[0]]} responses "
                                f"with finish code {named[0]} (stop string {named[0] - first}); the store's settings "
                                f"list {stop_strings} (codes 0 .. {first - 1 + stop_strings} expected)")
    return counts


def summarize(settings: dict[str, Any], units: Iterable[GenerationCounts]) -> dict[str, Any]:
    """``inspect``'s generation section: the settings, and over the ``units`` the number of responses, their mean
    and max length in tokens, the finish reasons and the hits per stop string (0: the string never ended one)."""
    units, first = list(units), FINISH_CODES["stop-string"]
    codes = np.zeros(max([first + len(settings.get("stop", [])), *(len(u.finish_codes) for u in units)]), np.int64)
    for u in units:
        codes[:len(u.finish_codes)] += u.finish_codes
    responses, tokens = int(codes.sum()), sum(u.response_tokens for u in units)
    return {"settings": settings, "responses": responses,
            "mean_response_tokens": tokens / responses if responses else 0.0,
            "max_response_tokens": max((u.max_response_tokens for u in units), default=0),
            "finish_reasons": {reason: int(codes[c:].sum() if c == first else codes[c])  # every stop string's
                               for reason, c in FINISH_CODES.items()},
            "stop_string_hits": {s: int(codes[first + i]) for i, s in enumerate(settings.get("stop", []))}}


def inspect_section(spec: ShardSpec, settings: dict[str, Any] | None, records: Iterable[ShardRecord],
                    read: Callable[[ShardRecord], UnitRows]) -> tuple[dict[str, Any], list[str]]:
    """``({"generation": summary}, problems)`` for ``inspect`` of a generated store (``({}, [])`` for any other):
    :func:`summarize` over the committed units, from their records' counts (a record written before them: the
    unit read by ``read``); a unit that cannot be read, or a record naming an unlisted stop string, is a problem."""
    if settings is None:
        return {}, []
    stops = len(settings.get("stop", []))
    try:
        units = [recorded_counts(r, stops) or read_counts(unit_rows(spec, r.index, read(r), stops)) for r in records]
    except StoreError as exc:
        return {"generation": {"settings": settings}}, [f"generation statistics: {exc}"]
    return {"generation": summarize(settings, units)}, []


def check_counts(spec: ShardSpec, stop_strings: int, record: ShardRecord, unit: UnitRows) -> None:
    """``verify``: refuse a generated unit whose record's counts are not its rows'."""
    recorded = record.generation if spec.generated else None
    if recorded is not None and recorded != (found := read_counts(unit_rows(spec, record.index, unit, stop_strings))):
        raise CorruptShardError(f"shard {record.index}: its rows hold {_described(found)}; the manifest's generation "
                                f"counts record {_described(recorded)}")


def _described(counts: GenerationCounts) -> str:
    return (f"{counts.response_tokens} response tokens (the longest {counts.max_response_tokens}) and rows per finish "
            f"code {list(counts.finish_codes)}")


__all__ = ["GeneratedRow", "check_counts", "committed_counts", "count_responses", "inspect_section", "prompt_length",
           "read_counts", "recorded_counts", "summarize", "unit_rows"]
