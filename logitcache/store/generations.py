"""Read side of a store of teacher-generated responses: each row's prompt, response and finish reason.

A generated store is a ``documents`` store whose manifest holds ``corpus.layout.generate`` (the settings)
and whose rows carry a ``finish_reason`` column (docs/format.md, "Generated responses"). A row's
response is its trained part: tokens ``prompt_length ..`` where ``prompt_length`` is one past the first
trained position. Nothing here decodes targets; :func:`logitcache.capture.export.iter_generated` reads a
whole store, ``inspect`` summarises one (:func:`summarize`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import StoreError
from .encoding import row_mask
from .finish import FINISH_CODES, row_finish
from .records import ShardRecord
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
                           int(np.argmax(row_mask(columns))) + 1, finish, stop_string)


def summarize(settings: dict[str, Any], rows: Iterable[GeneratedRow]) -> dict[str, Any]:
    """``inspect``'s generation section: the settings, and over ``rows`` the number of responses, their mean and
    max length in tokens, the finish reasons and the hits per stop string (0: the string never ended a response)."""
    lengths, reasons, hits = [], Counter(), Counter()
    for row in rows:
        lengths.append(row.response.size)
        reasons[row.finish] += 1
        if row.stop_string is not None:
            hits[row.stop_string] += 1
    return {"settings": settings, "responses": len(lengths),
            "mean_response_tokens": float(np.mean(lengths)) if lengths else 0.0,
            "max_response_tokens": max(lengths, default=0),
            "finish_reasons": {r: reasons[r] for r in FINISH_CODES},
            "stop_string_hits": {s: hits[i] for i, s in enumerate(settings.get("stop", []))}}


def inspect_section(spec: ShardSpec, settings: dict[str, Any] | None, records: Iterable[ShardRecord],
                    read: Callable[[ShardRecord], UnitRows]) -> tuple[dict[str, Any], list[str]]:
    """``({"generation": summary}, problems)`` for ``inspect`` of a generated store (``({}, [])`` for any other):
    :func:`summarize` over the committed units, each read by ``read``; a unit that cannot be read is a problem."""
    if settings is None:
        return {}, []
    try:
        stops = len(settings.get("stop", []))
        rows = [row for r in sorted(records, key=lambda r: r.index) for row in unit_rows(spec, r.index, read(r), stops)]
    except StoreError as exc:
        return {"generation": {"settings": settings}}, [f"generation statistics: {exc}"]
    return {"generation": summarize(settings, rows)}, []


__all__ = ["GeneratedRow", "inspect_section", "summarize", "unit_rows"]
