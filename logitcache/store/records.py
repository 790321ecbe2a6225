"""Unit records and the field checks every part of a manifest uses.

A unit record (a manifest's ``shards[i]``, or the unit's file under ``commits/``) names the unit's
objects with their sizes and sha256s, its counts and measured error, and its ``binding`` to the store
header. The checks (``int_field``, ``str_field``, ...) refuse a JSON value of the wrong type or range
with one message naming the field, the value found and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import StoreError
from .encoding import Encoding

MAX_COUNT = 1 << 48  # bytes, sequences, positions, entries of one shard or one store
MAX_SEQ_LEN = 1 << 24  # positions per window; far beyond any teacher's context
MAX_OBJECTS = 1024  # objects of one unit
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HINT = "The manifest is damaged or was not written by logitcache: run `logitcache verify`, or recapture."


def fail(where: str, name: str, value: Any, expected: str) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise StoreError(f"{where}: {name} is {shown}; expected {expected}. {_HINT}")


def int_field(where: str, name: str, value: Any, low: int, high: int | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        fail(where, name, value, f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")
    return value


def number_field(where: str, name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        fail(where, name, value, "a number >= 0")
    return float(value)


def str_field(where: str, name: str, value: Any, choices: tuple[str, ...] = ()) -> str:
    if choices and value not in choices:
        fail(where, name, value, f"one of {', '.join(choices)}")
    if not isinstance(value, str):
        fail(where, name, value, "a string")
    return value


def mapping_field(where: str, name: str, value: Any, keys: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        fail(where, name, value, "a mapping")
    for key in keys:
        if key not in value:
            raise StoreError(f"{where}: {name}.{key} is missing. {_HINT}")
    return value


def lengths_field(where: str, name: str, value: Any, sequences: int) -> tuple[int, ...]:
    """A unit's row lengths: a list of ``sequences`` token counts, each in ``[2, MAX_SEQ_LEN + 1]`` (a row has
    at least one position; the bound by the store's ``seq_len`` is checked with the header)."""
    if not isinstance(value, list) or len(value) != sequences:
        fail(where, name, value, f"a list of {sequences} token counts, one per sequence of the unit")
    for j, n in enumerate(value):
        int_field(where, f"{name}[{j}]", n, 2, MAX_SEQ_LEN + 1)
    return tuple(value)


def histogram_field(where: str, name: str, value: Any, positions: int) -> tuple[int, ...]:
    """A unit's histogram of draws per position: at most 65535 counts (``[i]``: positions with ``i + 1`` draws)
    summing to the unit's ``positions``."""
    if not isinstance(value, list) or not 1 <= len(value) <= 65535:
        fail(where, name, value, "a list of 1 to 65535 position counts ([i]: positions given i + 1 draws)")
    for j, n in enumerate(value):
        int_field(where, f"{name}[{j}]", n, 0, MAX_COUNT)
    if sum(value) != positions:
        fail(where, f"sum of {name}", sum(value), f"the unit's positions, {positions}")
    return tuple(value)


@dataclass(frozen=True)
class GenerationCounts:
    """A generated unit's responses, summed at commit for ``inspect``: their tokens (``response_tokens``, the sum,
    and ``max_response_tokens``) and the rows per finish code (``finish_codes[c]``: rows whose ``finish_reason``
    is ``c``: 0 stop token, 1 ``max_new_tokens``, ``2 + i`` stop string ``i``; up to the largest code found)."""

    response_tokens: int
    max_response_tokens: int
    finish_codes: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Any, where: str, name: str, sequences: int) -> GenerationCounts:
        """A record's ``generation``: counts in range, one finish code per row, the largest response within the
        sum and the sum within ``sequences`` largest ones."""
        mapping_field(where, name, d, ("response_tokens", "max_response_tokens", "finish_codes"))
        total = int_field(where, f"{name}.response_tokens", d["response_tokens"], 0, MAX_COUNT)
        largest = int_field(where, f"{name}.max_response_tokens", d["max_response_tokens"], 0, MAX_SEQ_LEN)
        codes = d["finish_codes"]
        if not isinstance(codes, list) or not 1 <= len(codes) <= 256:
            fail(where, f"{name}.finish_codes", codes, "a list of 1 to 256 row counts ([c]: rows with finish code c)")
        for j, n in enumerate(codes):
            int_field(where, f"{name}.finish_codes[{j}]", n, 0, MAX_COUNT)
        if sum(codes) != sequences:
            fail(where, f"sum of {name}.finish_codes", sum(codes), f"the unit's sequences, {sequences}")
        if not largest <= total <= largest * sequences:
            fail(where, f"{name}.response_tokens", total, f"from max_response_tokens = {largest} to {sequences} × "
                 "that (the sum of the unit's response lengths)")
        return cls(total, largest, tuple(codes))


def as_json(value: Any) -> Any:
    """A typed value as the JSON logitcache writes: fields in order, ``None`` fields left out."""
    if isinstance(value, Encoding):
        return value.to_manifest()
    if dataclasses.is_dataclass(value):
        pairs = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return {name: as_json(v) for name, v in pairs if v is not None}
    if isinstance(value, tuple):
        return [as_json(v) for v in value]
    return copy.deepcopy(value)


@dataclass(frozen=True)
class ObjectRecord:
    """One object of a unit: path relative to the store root, size and sha256."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, d: Any, where: str, name: str) -> ObjectRecord:
        mapping_field(where, name, d, ("path", "bytes", "sha256"))
        size = int_field(where, f"{name}.bytes", d["bytes"], 0, MAX_COUNT)
        if not isinstance(d["sha256"], str) or not SHA256_HEX.fullmatch(d["sha256"]):
            fail(where, f"{name}.sha256", d["sha256"], "64 lowercase hex digits")
        if not isinstance(d["path"], str) or not d["path"]:
            fail(where, f"{name}.path", d["path"], "a path such as 'shards/00000.arrow'")
        return cls(d["path"], size, d["sha256"])  # whether the path stays inside the store is checked on read


def unit_binding(header_sha256: str, index: int, object_sha256s: list[str]) -> str:
    """sha256 of ``"<header_sha256>:<index>:<sha256 of object 1>:<sha256 of object 2>..."`` (objects in record
    order): ties a unit record to the store it was written for (docs/format.md, manifest section)."""
    return hashlib.sha256(":".join([header_sha256, str(index), *object_sha256s]).encode()).hexdigest()


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest records of one committed unit (its objects, counts and measured error), its
    ``binding`` to the store header (None in stores written before bindings) and, in a ``documents``
    store, the token count ``L`` of each of its rows (``lengths``; None in packed stores, whose rows
    all hold ``seq_len + 1`` tokens, and in documents stores written before the field) and, in a generated
    store, its responses' :class:`GenerationCounts` (``generation``; None in stores written before the field)."""

    index: int
    sequences: int
    positions: int
    entries: int
    objects: tuple[ObjectRecord, ...] = field(default=())
    max_logprob_error: float = 0.0
    max_prob_error: float = 0.0
    binding: str | None = None
    lengths: tuple[int, ...] | None = None  # tokens of each row, in row order (documents stores; packed: None)
    sample_totals: tuple[int, ...] | None = None  # adaptive budgets: [i] = positions given i + 1 draws (inspect)
    generation: GenerationCounts | None = None  # generated responses: their lengths and finish codes (inspect)

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.objects)

    @property
    def sha256(self) -> str:
        """One digest over the unit's objects (identifies the unit's bytes)."""
        return hashlib.sha256("".join(o.sha256 for o in self.objects).encode()).hexdigest()

    def binding_for(self, header_sha256: str) -> str:
        """The binding this record must carry in the store whose header digest is ``header_sha256``."""
        return unit_binding(header_sha256, self.index, [o.sha256 for o in self.objects])

    def to_dict(self) -> dict[str, Any]:
        return as_json(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "unit record", name: str = "shard") -> ShardRecord:
        """One unit entry (a manifest ``shards[i]`` or a commit record): fields, types, ranges, its objects."""
        mapping_field(where, name, d, ("index", "sequences", "positions", "entries", "objects"))
        counts = {key: int_field(where, f"{name}.{key}", d[key], 0, MAX_COUNT)
                  for key in ("index", "sequences", "positions", "entries")}
        errors = {key: number_field(where, f"{name}.{key}", d.get(key, 0.0))
                  for key in ("max_logprob_error", "max_prob_error")}
        objects = d["objects"]
        if not isinstance(objects, list) or not 1 <= len(objects) <= MAX_OBJECTS:
            fail(where, f"{name}.objects", objects, f"a list of 1 to {MAX_OBJECTS} object entries")
        records = tuple(ObjectRecord.from_dict(o, where, f"{name}.objects[{j}]") for j, o in enumerate(objects))
        binding = d.get("binding")  # optional: absent in stores written before bindings
        if binding is not None and (not isinstance(binding, str) or not SHA256_HEX.fullmatch(binding)):
            fail(where, f"{name}.binding", binding, "64 lowercase hex digits")
        lengths = d.get("lengths")  # optional: documents stores only
        if lengths is not None:
            lengths = lengths_field(where, f"{name}.lengths", lengths, counts["sequences"])
        histogram = d.get("sample_totals")  # optional: adaptive-budget stores only
        if histogram is not None:
            histogram = histogram_field(where, f"{name}.sample_totals", histogram, counts["positions"])
        generation = d.get("generation")  # optional: generated stores written since the field
        if generation is not None:
            generation = GenerationCounts.from_dict(generation, where, f"{name}.generation", counts["sequences"])
        return cls(objects=records, **counts, **errors, binding=binding, lengths=lengths, sample_totals=histogram,
                   generation=generation)

    @classmethod
    def build(cls, index: int, sequences: int, positions: int, entries: int, objects: list[tuple[str, bytes]],
              max_logprob_error: float = 0.0, max_prob_error: float = 0.0, *,
              header_sha256: str | None = None, lengths: tuple[int, ...] | None = None,
              sample_totals: tuple[int, ...] | None = None, generation: GenerationCounts | None = None
              ) -> ShardRecord:
        """A unit's record from its objects (and its rows' token counts, ``lengths``, in a documents store; the
        histogram of draws per position, ``sample_totals``, in an adaptive-budget store; the responses' counts,
        ``generation``, in a generated store); bound to the store whose header digest is ``header_sha256`` if
        given."""
        recs = tuple(ObjectRecord(p, len(b), hashlib.sha256(b).hexdigest()) for p, b in objects)
        record = cls(index, sequences, positions, entries, recs, max_logprob_error, max_prob_error, lengths=lengths,
                     sample_totals=sample_totals, generation=generation)
        if header_sha256 is None:
            return record
        return dataclasses.replace(record, binding=record.binding_for(header_sha256))
