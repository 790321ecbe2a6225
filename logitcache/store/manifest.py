"""The manifest as typed values, each built by a ``from_dict`` that checks it before any reader trusts a number.

A manifest is JSON that anyone can edit, so :meth:`Manifest.from_dict` checks every field a reader
uses for presence, type and range, with one error naming the field, the value found and what was
expected. Shard contents are checked elsewhere (checksums); this module only guards the bookkeeping:
indices unique and within the plan, counts non-negative and bounded, positions equal to
``sequences · seq_len``. Paths escaping the store are refused per shard when opened
(:func:`logitcache.store.reader.object_path`), so `verify` can name each one.

``to_dict`` gives back the JSON logitcache writes, field for field. The header digest is not held:
``ManifestHeader.to_dict`` computes it, and ``from_dict`` refuses a header that does not match its own.
Sections the store only records and compares (``identity``, ``params``, ``teacher``, ``corpus``) stay
JSON mappings, copied in and out.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..choices import COMPRESSIONS, FORMATS, METHODS
from ..errors import StoreError
from .encoding import Encoding

FORMAT_NAME = "logitcache"
FORMAT_VERSION = 2
MAX_COUNT = 1 << 48  # bytes, sequences, positions, entries of one shard or one store
MAX_SEQ_LEN = 1 << 24  # positions per window; far beyond any teacher's context
MAX_OBJECTS = 1024  # objects of one unit
_SHA256 = re.compile(r"[0-9a-f]{64}")
HEADER_DIGEST = "header_sha256"
_NOT_HEADER = ("shards", "complete", HEADER_DIGEST)
_HEADER_KEYS = ("method", "params", "head_size", "identity", "teacher", "tokenizer", "corpus", "seq_len", "plan",
                "store")
_RESUME_KEYS = ("identity", "teacher", "tokenizer", "corpus", "plan")  # what a resumed capture must match
# ... except these: where the corpus was read from and what the reader listed (the content is compared through
# corpus.fingerprint and corpus.stats); identity.corpus.source is held by stores written before that rule
_DISPLAY_ONLY = ("identity.corpus.source", "corpus.source", "corpus.input")
_HINT = "The manifest is damaged or was not written by logitcache: run `logitcache verify`, or recapture."


def _fail(where: str, name: str, value: Any, expected: str) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise StoreError(f"{where}: {name} is {shown}; expected {expected}. {_HINT}")


def _int(where: str, name: str, value: Any, low: int, high: int | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        _fail(where, name, value, f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")
    return value


def _number(where: str, name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        _fail(where, name, value, "a number >= 0")
    return float(value)


def _str(where: str, name: str, value: Any, choices: tuple[str, ...] = ()) -> str:
    if choices and value not in choices:
        _fail(where, name, value, f"one of {', '.join(choices)}")
    if not isinstance(value, str):
        _fail(where, name, value, "a string")
    return value


def _mapping(where: str, name: str, value: Any, keys: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        _fail(where, name, value, "a mapping")
    for key in keys:
        if key not in value:
            raise StoreError(f"{where}: {name}.{key} is missing. {_HINT}")
    return value


def _json(value: Any) -> Any:
    """A typed value as the JSON logitcache writes: fields in order, ``None`` fields left out."""
    if isinstance(value, Encoding):
        return value.to_manifest()
    if dataclasses.is_dataclass(value):
        pairs = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return {name: _json(v) for name, v in pairs if v is not None}
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    return copy.deepcopy(value)


@dataclass(frozen=True)
class ObjectRecord:
    """One object of a unit: path relative to the store root, size and sha256."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, d: Any, where: str, name: str) -> ObjectRecord:
        _mapping(where, name, d, ("path", "bytes", "sha256"))
        size = _int(where, f"{name}.bytes", d["bytes"], 0, MAX_COUNT)
        if not isinstance(d["sha256"], str) or not _SHA256.fullmatch(d["sha256"]):
            _fail(where, f"{name}.sha256", d["sha256"], "64 lowercase hex digits")
        if not isinstance(d["path"], str) or not d["path"]:
            _fail(where, f"{name}.path", d["path"], "a path such as 'shards/00000.arrow'")
        return cls(d["path"], size, d["sha256"])  # whether the path stays inside the store is checked on read


def unit_binding(header_sha256: str, index: int, object_sha256s: list[str]) -> str:
    """sha256 of ``"<header_sha256>:<index>:<sha256 of object 1>:<sha256 of object 2>..."`` (objects in record
    order): ties a unit record to the store it was written for (docs/format.md, manifest section)."""
    return hashlib.sha256(":".join([header_sha256, str(index), *object_sha256s]).encode()).hexdigest()


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest records of one committed unit (its objects, counts and measured error), and its
    ``binding`` to the store header (None in stores written before bindings)."""

    index: int
    sequences: int
    positions: int
    entries: int
    objects: tuple[ObjectRecord, ...] = field(default=())
    max_logprob_error: float = 0.0
    max_prob_error: float = 0.0
    binding: str | None = None

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
        return _json(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "unit record", name: str = "shard") -> ShardRecord:
        """One unit entry (a manifest ``shards[i]`` or a commit record): fields, types, ranges, its objects."""
        _mapping(where, name, d, ("index", "sequences", "positions", "entries", "objects"))
        counts = {key: _int(where, f"{name}.{key}", d[key], 0, MAX_COUNT)
                  for key in ("index", "sequences", "positions", "entries")}
        errors = {key: _number(where, f"{name}.{key}", d.get(key, 0.0))
                  for key in ("max_logprob_error", "max_prob_error")}
        objects = d["objects"]
        if not isinstance(objects, list) or not 1 <= len(objects) <= MAX_OBJECTS:
            _fail(where, f"{name}.objects", objects, f"a list of 1 to {MAX_OBJECTS} object entries")
        records = tuple(ObjectRecord.from_dict(o, where, f"{name}.objects[{j}]") for j, o in enumerate(objects))
        binding = d.get("binding")  # optional: absent in stores written before bindings
        if binding is not None and (not isinstance(binding, str) or not _SHA256.fullmatch(binding)):
            _fail(where, f"{name}.binding", binding, "64 lowercase hex digits")
        return cls(objects=records, **counts, **errors, binding=binding)

    @classmethod
    def build(cls, index: int, sequences: int, positions: int, entries: int, objects: list[tuple[str, bytes]],
              max_logprob_error: float = 0.0, max_prob_error: float = 0.0, *,
              header_sha256: str | None = None) -> ShardRecord:
        """A unit's record from its objects; bound to the store whose header digest is ``header_sha256`` if given."""
        recs = tuple(ObjectRecord(p, len(b), hashlib.sha256(b).hexdigest()) for p, b in objects)
        record = cls(index, sequences, positions, entries, recs, max_logprob_error, max_prob_error)
        if header_sha256 is None:
            return record
        return dataclasses.replace(record, binding=record.binding_for(header_sha256))


@dataclass(frozen=True)
class TokenizerSection:
    """The teacher tokenizer a student must share (its fingerprint) and its end-of-sequence id."""

    fingerprint: str
    eos_id: int | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TokenizerSection:
        fingerprint = _mapping(where, "tokenizer", d, ("fingerprint",))["fingerprint"]
        _str(where, "tokenizer.fingerprint", fingerprint)
        eos_id = d.get("eos_id")
        return cls(fingerprint, None if eos_id is None else _int(where, "tokenizer.eos_id", eos_id, 0, MAX_COUNT))


@dataclass(frozen=True)
class PlanSection:
    """How the corpus was cut: windows, positions, units and windows per unit."""

    sequences: int
    positions: int
    shards: int
    sequences_per_shard: int

    @classmethod
    def from_dict(cls, d: Any, where: str) -> PlanSection:
        _mapping(where, "plan", d, ("shards", "sequences", "sequences_per_shard", "positions"))
        shards = _int(where, "plan.shards", d["shards"], 0, MAX_COUNT)
        sequences = _int(where, "plan.sequences", d["sequences"], 0, MAX_COUNT)
        per_shard = _int(where, "plan.sequences_per_shard", d["sequences_per_shard"], 1, MAX_COUNT)
        positions = _int(where, "plan.positions", d["positions"], 0, MAX_COUNT)
        return cls(sequences, positions, shards, per_shard)


@dataclass(frozen=True)
class StoreSection:
    """The physical form of every unit: container, its compression, and the row encoding."""

    format: str
    compression: str
    compression_level: int
    encoding: Encoding

    @classmethod
    def from_dict(cls, d: Any, where: str) -> StoreSection:
        _mapping(where, "store", d, ("format", "compression", "compression_level", "encoding"))
        encoding = _mapping(where, "store.encoding", d["encoding"])
        level = _int(where, "store.compression_level", d["compression_level"], 0, 22)
        fmt = _str(where, "store.format", d["format"], FORMATS)
        compression = _str(where, "store.compression", d["compression"], COMPRESSIONS)
        return cls(fmt, compression, level, _encoding(encoding, where))


def _encoding(d: dict[str, Any], where: str) -> Encoding:
    try:
        return Encoding.from_manifest(d)
    except StoreError:
        raise  # an encoding version this logitcache does not read: the error says so
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        _fail(where, "store.encoding", d, f"a row encoding written by logitcache ({type(exc).__name__}: {exc})")


@dataclass(frozen=True, kw_only=True)
class ManifestHeader:
    """Everything a reader needs to decode the units, and what a resumed capture must match.

    Fields are in the order the capture writes them; ``seed`` and ``written_by`` are optional."""

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    identity: dict[str, Any]
    method: str
    params: dict[str, Any]
    head_size: int
    seed: int | None = None
    teacher: dict[str, Any]
    tokenizer: TokenizerSection
    corpus: dict[str, Any]
    seq_len: int
    plan: PlanSection
    store: StoreSection
    written_by: str | None = None

    @property
    def num_samples(self) -> int:
        """Draws per position (``params.samples``); 0 for methods that draw none."""
        return self.params.get("samples", 0)

    @property
    def weighted(self) -> bool:
        """Whether rows carry importance weights: sampling at a temperature other than 1."""
        return self.method == "sample" and self.params.get("temperature", 1.0) != 1.0

    @property
    def identity_seed(self) -> int:
        """The seed recorded in ``identity`` (what a resume compares)."""
        return self.identity["seed"]

    def to_dict(self) -> dict[str, Any]:
        return with_header_digest(_json(self))

    def converted(self, store: StoreSection, options: dict[str, Any]) -> ManifestHeader:
        """This header for a copy re-encoded as ``store``; the convert ``options`` given join ``identity.store``."""
        identity = copy.deepcopy(self.identity)
        identity["store"] = {**identity.get("store", {}), **options}
        return dataclasses.replace(self, identity=identity, store=store)

    def first_difference(self, other: ManifestHeader) -> str | None:
        """``'name: store has X, this run has Y'`` for the first field a resume must match where ``other``
        differs from this header (identity, teacher, tokenizer, corpus, plan; display-only fields aside);
        None if none does. Fields are compared in ``other``'s order, so a changed method is named before
        the parameters it brings along."""
        mine, theirs = _json(self), _json(other)
        for key in _RESUME_KEYS:
            diff = _first_difference(mine[key], theirs[key], f"{key}.")
            if diff:
                return diff
        return None

    def same_but_for_display(self, other: ManifestHeader) -> bool:
        """Whether ``other`` equals this header once the display-only fields are left out of both."""
        return _without_display(_json(self)) == _without_display(_json(other))

    def identity_difference(self, identity: dict[str, Any]) -> str | None:
        """:meth:`first_difference` for the ``identity`` section alone (a run's config, before it plans)."""
        return _first_difference(self.identity, identity, "identity.")

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> ManifestHeader:
        """The header of a manifest (or of a bare header dict): format, digest, then every field."""
        _check_format(d, where)
        found = d.get(HEADER_DIGEST)
        if found != header_digest(d):
            _fail(where, HEADER_DIGEST, found, f"{header_digest(d)}, the sha256 of the header fields "
                  "(a header field was changed after the capture wrote it)")
        _mapping(where, "manifest", d, _HEADER_KEYS)
        method = _str(where, "method", d["method"], METHODS)
        params = _params(d["params"], where)
        identity = _mapping(where, "identity", d["identity"], ("seed",))
        _int(where, "identity.seed", identity["seed"], 0, None)
        teacher = _mapping(where, "teacher", d["teacher"])
        corpus = _mapping(where, "corpus", d["corpus"])
        store = StoreSection.from_dict(d["store"], where)
        tokenizer = TokenizerSection.from_dict(d["tokenizer"], where)
        head_size = _int(where, "head_size", d["head_size"], 0, MAX_SEQ_LEN)
        seq_len = _int(where, "seq_len", d["seq_len"], 1, MAX_SEQ_LEN)
        plan = PlanSection.from_dict(d["plan"], where)
        seed, written_by = d.get("seed"), d.get("written_by")
        return cls(identity=copy.deepcopy(identity), method=method, params=copy.deepcopy(params),
                   head_size=head_size, seed=None if seed is None else _int(where, "seed", seed, 0, None),
                   teacher=copy.deepcopy(teacher), tokenizer=tokenizer, corpus=copy.deepcopy(corpus),
                   seq_len=seq_len, plan=plan, store=store,
                   written_by=None if written_by is None else _str(where, "written_by", written_by))


def _check_format(d: Any, where: str) -> None:
    _mapping(where, "manifest", d)
    if d.get("format") != FORMAT_NAME:
        raise StoreError(f"{where} is not a logitcache manifest (format={d.get('format')!r}); "
                         f"expected format {FORMAT_NAME!r}")
    if d.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{where} has format_version {d.get('format_version')!r}; this logitcache reads version "
                         f"{FORMAT_VERSION}. Upgrade logitcache or recapture the store.")


def _params(d: Any, where: str) -> dict[str, Any]:
    _mapping(where, "params", d)
    if "samples" in d:
        _int(where, "params.samples", d["samples"], 0, MAX_COUNT)
    if "temperature" in d:
        _number(where, "params.temperature", d["temperature"])
    return d


@dataclass(frozen=True)
class Manifest:
    """A store's manifest: its header, whether the capture finished, and the committed units by index."""

    header: ManifestHeader
    complete: bool = False
    shards: tuple[ShardRecord, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**self.header.to_dict(), "complete": self.complete, "shards": [s.to_dict() for s in self.shards]}

    def with_shards(self, records: list[ShardRecord], where: str) -> Manifest:
        """This manifest listing ``records`` (an incomplete store's commit records), checked against the plan."""
        _check_shards(tuple(records), self.header, where)
        return dataclasses.replace(self, shards=tuple(records))

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> Manifest:
        """Header digest; every field readers use; shard entries consistent with the plan and each other."""
        header = ManifestHeader.from_dict(d, where)
        shards = _mapping(where, "manifest", d, ("shards",))["shards"]
        if not isinstance(shards, list):
            _fail(where, "shards", shards, "a list of shard entries")
        records = tuple(ShardRecord.from_dict(e, where, f"shards[{i}]") for i, e in enumerate(shards))
        _check_shards(records, header, where)
        return cls(header, bool(d.get("complete")), records)


def _check_shards(records: tuple[ShardRecord, ...], header: ManifestHeader, where: str) -> None:
    planned, seq_len = header.plan.shards, header.seq_len
    seen: set[int] = set()
    for i, record in enumerate(records):
        name = f"shards[{i}]"
        if record.index >= planned or record.index in seen:
            _fail(where, f"{name}.index", record.index, f"a unique index below plan.shards = {planned}")
        seen.add(record.index)
        if record.positions != record.sequences * seq_len:
            _fail(where, f"{name}.positions", record.positions,
                  f"sequences × seq_len = {record.sequences} × {seq_len}")
    total = sum(r.sequences for r in records)
    if total > header.plan.sequences:
        _fail(where, "sum of shards[].sequences", total, f"at most plan.sequences = {header.plan.sequences}")


def header_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON of every manifest field except ``shards``, ``complete`` and itself."""
    header = {k: v for k, v in manifest.items() if k not in _NOT_HEADER}
    return hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_header_digest(header: dict) -> dict:
    """``header`` plus its :func:`header_digest`, so an edited or bit-flipped header is detected."""
    return {**header, HEADER_DIGEST: header_digest(header)}


def _without_display(header: dict[str, Any]) -> dict[str, Any]:
    """``header`` (a JSON copy, changed in place) without the :data:`_DISPLAY_ONLY` fields."""
    for dotted in _DISPLAY_ONLY:
        *parents, leaf = dotted.split(".")
        node = header
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return header


def _first_difference(found: Any, expected: Any, prefix: str = "") -> str | None:
    """Dotted name and values of the first field where two JSON values differ, else None: keys in
    ``expected``'s order, then those only ``found`` has; :data:`_DISPLAY_ONLY` fields are not compared."""
    if prefix.rstrip(".") in _DISPLAY_ONLY:
        return None
    if isinstance(found, dict) and isinstance(expected, dict):
        for key in [*expected, *sorted(set(found) - set(expected))]:
            diff = _first_difference(found.get(key), expected.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    if found != expected:
        return f"{prefix.rstrip('.')}: store has {found!r}, this run has {expected!r}"
    return None
