"""The manifest as typed values, each built by a ``from_dict`` that checks it before any reader trusts a number.

A manifest is JSON that anyone can edit, so :meth:`Manifest.from_dict` checks every field a reader
uses for presence, type and range, with one error naming the field, the value found and what was
expected. Shard contents are checked elsewhere (checksums); this module only guards the bookkeeping:
indices unique and within the plan, counts non-negative and bounded, positions equal to
``sequences · seq_len`` (at most that in a ``documents`` store, whose positions are the trained ones), and
a ``documents`` unit's row lengths (one per sequence, each ``2 … seq_len + 1``).
Paths escaping the store are refused per shard when opened (:func:`logitcache.store.reader.object_path`),
so `verify` can name each one.

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
import zlib
from dataclasses import dataclass
from typing import Any

from ..choices import ALLOCATIONS, COMPRESSIONS, FORMATS, METHODS
from ..errors import StoreError
from .encoding import Encoding
from .records import (MAX_COUNT, MAX_SEQ_LEN, ShardRecord, as_json, fail, int_field, mapping_field, number_field,
                      str_field)

FORMAT_NAME = "logitcache"
FORMAT_VERSION = 2  # what a packed store is written with
LAYOUTS = {None: FORMAT_VERSION, "documents": 3}  # each layout (None: packed) and the format_version it writes
HEADER_DIGEST = "header_sha256"
_NOT_HEADER = ("shards", "complete", HEADER_DIGEST)
_HEADER_KEYS = ("method", "params", "head_size", "identity", "teacher", "tokenizer", "corpus", "seq_len", "plan",
                "store")
_RESUME_KEYS = ("identity", "teacher", "tokenizer", "corpus", "plan")  # what a resumed capture must match
# ... except these: where the corpus was read from and what the reader listed (the content is compared through
# corpus.fingerprint and corpus.stats; identity.corpus.source is held by stores written before that rule), where
# the teacher was loaded from (its weights are compared through teacher.weights_sha256), and which logitcache
# wrote the header: a resume on another machine, or after an upgrade, keeps the committed units
_DISPLAY_ONLY = ("identity.corpus.source", "corpus.source", "corpus.input", "identity.teacher.model", "teacher.name",
                 "written_by")


@dataclass(frozen=True)
class TokenizerSection:
    """The teacher tokenizer a student must share (its fingerprint) and its end-of-sequence id."""

    fingerprint: str
    eos_id: int | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TokenizerSection:
        fingerprint = mapping_field(where, "tokenizer", d, ("fingerprint",))["fingerprint"]
        str_field(where, "tokenizer.fingerprint", fingerprint)
        eos_id = d.get("eos_id")
        return cls(fingerprint, None if eos_id is None else int_field(where, "tokenizer.eos_id", eos_id, 0, MAX_COUNT))


@dataclass(frozen=True)
class PlanSection:
    """How the corpus was cut: windows, positions, units and windows per unit."""

    sequences: int
    positions: int
    shards: int
    sequences_per_shard: int

    @classmethod
    def from_dict(cls, d: Any, where: str) -> PlanSection:
        mapping_field(where, "plan", d, ("shards", "sequences", "sequences_per_shard", "positions"))
        shards = int_field(where, "plan.shards", d["shards"], 0, MAX_COUNT)
        sequences = int_field(where, "plan.sequences", d["sequences"], 0, MAX_COUNT)
        per_shard = int_field(where, "plan.sequences_per_shard", d["sequences_per_shard"], 1, MAX_COUNT)
        positions = int_field(where, "plan.positions", d["positions"], 0, MAX_COUNT)
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
        mapping_field(where, "store", d, ("format", "compression", "compression_level", "encoding"))
        encoding = mapping_field(where, "store.encoding", d["encoding"])
        level = int_field(where, "store.compression_level", d["compression_level"], 0, 22)
        fmt = str_field(where, "store.format", d["format"], FORMATS)
        compression = str_field(where, "store.compression", d["compression"], COMPRESSIONS)
        return cls(fmt, compression, level, _encoding(encoding, where))


def _encoding(d: dict[str, Any], where: str) -> Encoding:
    try:
        return Encoding.from_manifest(d)
    except StoreError:
        raise  # an encoding version this logitcache does not read: the error says so
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        fail(where, "store.encoding", d, f"a row encoding written by logitcache ({type(exc).__name__}: {exc})")


@dataclass(frozen=True, kw_only=True)
class ManifestHeader:
    """Everything a reader needs to decode the units, and what a resumed capture must match.

    Fields are in the order the capture writes them; ``seed``, ``layout`` and ``written_by`` are optional.
    ``format_version`` follows from ``layout`` (:data:`LAYOUTS`): 2 for packed windows, 3 for ``documents``."""

    format: str = FORMAT_NAME
    format_version: int = dataclasses.field(init=False)
    identity: dict[str, Any]
    method: str
    params: dict[str, Any]
    head_size: int
    seed: int | None = None
    teacher: dict[str, Any]
    tokenizer: TokenizerSection
    corpus: dict[str, Any]
    seq_len: int
    layout: str | None = None  # None: packed windows; "documents": masked rows with compact targets
    plan: PlanSection
    store: StoreSection
    written_by: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise StoreError(f"a manifest header's layout is None (packed windows) or 'documents'; found "
                             f"{self.layout!r}")
        object.__setattr__(self, "format_version", LAYOUTS[self.layout])

    @property
    def masked(self) -> bool:
        """Whether rows carry a train mask and targets only at its positions (the ``documents`` layout)."""
        return self.layout == "documents"

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
        return with_header_digest(as_json(self))

    def converted(self, store: StoreSection, options: dict[str, Any]) -> ManifestHeader:
        """This header for a copy re-encoded as ``store``; the convert ``options`` given join ``identity.store``."""
        identity = copy.deepcopy(self.identity)
        identity["store"] = {**identity.get("store", {}), **options}
        return dataclasses.replace(self, identity=identity, store=store)

    def first_difference(self, other: ManifestHeader) -> str | None:
        """``'name: store has X, this run has Y'`` for the first field a resume must match where ``other``
        differs from this header (identity, teacher, tokenizer, corpus, plan, layout; display-only fields aside);
        None if none does. Fields are compared in ``other``'s order, so a changed method is named before
        the parameters it brings along."""
        mine, theirs = as_json(self), as_json(other)
        for key in _RESUME_KEYS:
            diff = _first_difference(mine[key], theirs[key], f"{key}.")
            if diff:
                return diff
        if self.layout != other.layout:
            return f"layout: store has {self.layout or 'packed'!r}, this run has {other.layout or 'packed'!r}"
        return None

    def same_but_for_display(self, other: ManifestHeader) -> bool:
        """Whether ``other`` equals this header once the display-only fields are left out of both. The ``store``
        sections are compared as typed values: the rank order as ids, not as the compressed text another
        zlib build writes differently (:meth:`Encoding.order_text`)."""
        mine, theirs = (_without_display(as_json(dataclasses.replace(h, store=None))) for h in (self, other))
        return self.store == other.store and mine == theirs

    def identity_difference(self, identity: dict[str, Any]) -> str | None:
        """:meth:`first_difference` for the ``identity`` section alone (a run's config, before it plans)."""
        return _first_difference(self.identity, identity, "identity.")

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> ManifestHeader:
        """The header of a manifest (or of a bare header dict): format, version and layout, digest, then
        every field."""
        layout = _check_format(d, where)
        found = d.get(HEADER_DIGEST)
        if found != header_digest(d):
            fail(where, HEADER_DIGEST, found, f"{header_digest(d)}, the sha256 of the header fields "
                  "(a header field was changed after the capture wrote it)")
        mapping_field(where, "manifest", d, _HEADER_KEYS)
        method = str_field(where, "method", d["method"], METHODS)
        params = _params(d["params"], where)
        identity = mapping_field(where, "identity", d["identity"], ("seed",))
        int_field(where, "identity.seed", identity["seed"], 0, None)
        teacher = mapping_field(where, "teacher", d["teacher"])
        corpus = mapping_field(where, "corpus", d["corpus"])
        store = StoreSection.from_dict(d["store"], where)
        tokenizer = TokenizerSection.from_dict(d["tokenizer"], where)
        head_size = int_field(where, "head_size", d["head_size"], 0, MAX_SEQ_LEN)
        seq_len = int_field(where, "seq_len", d["seq_len"], 1, MAX_SEQ_LEN)
        plan = PlanSection.from_dict(d["plan"], where)
        _check_budget(params, store, where)
        seed, written_by = d.get("seed"), d.get("written_by")
        return cls(identity=copy.deepcopy(identity), method=method, params=copy.deepcopy(params),
                   head_size=head_size, seed=None if seed is None else int_field(where, "seed", seed, 0, None),
                   teacher=copy.deepcopy(teacher), tokenizer=tokenizer, corpus=copy.deepcopy(corpus),
                   seq_len=seq_len, layout=layout, plan=plan, store=store,
                   written_by=None if written_by is None else str_field(where, "written_by", written_by))


def _check_format(d: Any, where: str) -> str | None:
    """The manifest's layout (None: packed), once its format and its format_version agree with it."""
    mapping_field(where, "manifest", d)
    if d.get("format") != FORMAT_NAME:
        raise StoreError(f"{where} is not a logitcache manifest (format={d.get('format')!r}); "
                         f"expected format {FORMAT_NAME!r}")
    version, layout = d.get("format_version"), d.get("layout")
    if version not in LAYOUTS.values():
        raise StoreError(f"{where} has format_version {version!r}; this logitcache reads version "
                         f"{FORMAT_VERSION} (packed) and 3 (documents layout). Upgrade logitcache or recapture "
                         "the store.")
    expected = next(name for name, v in LAYOUTS.items() if v == version)
    if layout != expected:
        shown = "absent" if expected is None else repr(expected)
        fail(where, "layout", layout, f"{shown} in a format_version {version} manifest (version 2 stores packed "
             "windows without a layout key; version 3 stores layout 'documents')")
    return layout


def _params(d: Any, where: str) -> dict[str, Any]:
    mapping_field(where, "params", d)
    if "samples" in d:
        int_field(where, "params.samples", d["samples"], 0, MAX_COUNT)
    if "temperature" in d:
        number_field(where, "params.temperature", d["temperature"])
    if "allocation" in d:
        str_field(where, "params.allocation", d["allocation"], ALLOCATIONS[1:])
    return d


def _check_budget(params: dict[str, Any], store: StoreSection, where: str) -> None:
    """An adaptive budget (``params.allocation``) and the rows' per-position draws (``sample_totals``) go together."""
    adaptive = "allocation" in params
    if adaptive != store.encoding.sample_totals:
        fail(where, "store.encoding.sample_totals", store.encoding.sample_totals,
             f"{adaptive} with params.allocation {params.get('allocation', 'absent (fixed)')!r} (rows of an adaptive "
             "budget keep each position's draws)")


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
        shards = mapping_field(where, "manifest", d, ("shards",))["shards"]
        if not isinstance(shards, list):
            fail(where, "shards", shards, "a list of shard entries")
        records = tuple(ShardRecord.from_dict(e, where, f"shards[{i}]") for i, e in enumerate(shards))
        _check_shards(records, header, where)
        return cls(header, bool(d.get("complete")), records)


def _check_shards(records: tuple[ShardRecord, ...], header: ManifestHeader, where: str) -> None:
    """Indices unique and planned; positions ``sequences × seq_len`` (packed) or at most that (documents:
    the trained positions of rows of at most ``seq_len``); no more sequences than planned."""
    planned, seq_len = header.plan.shards, header.seq_len
    seen: set[int] = set()
    for i, record in enumerate(records):
        name = f"shards[{i}]"
        if record.index >= planned or record.index in seen:
            fail(where, f"{name}.index", record.index, f"a unique index below plan.shards = {planned}")
        seen.add(record.index)
        full = record.sequences * seq_len
        if header.masked and record.positions > full:
            fail(where, f"{name}.positions", record.positions,
                 f"at most sequences × seq_len = {record.sequences} × {seq_len} (trained positions of a documents "
                 "store)")
        if not header.masked and record.positions != full:
            fail(where, f"{name}.positions", record.positions,
                 f"sequences × seq_len = {record.sequences} × {seq_len}")
        if record.lengths is not None:
            _check_lengths(record, header, where, name)
        if record.generation is not None and generation_settings(header) is None:
            fail(where, f"{name}.generation", as_json(record.generation), "absent in a store that is not of "
                 "teacher-generated responses (no corpus.layout.generate in a documents store's header)")
        if record.sample_totals is not None and not header.store.encoding.sample_totals:
            fail(where, f"{name}.sample_totals", list(record.sample_totals), "absent in a store of a fixed sample "
                 "budget (store.encoding.sample_totals is false)")
    total = sum(r.sequences for r in records)
    if total > header.plan.sequences:
        fail(where, "sum of shards[].sequences", total, f"at most plan.sequences = {header.plan.sequences}")


def _check_lengths(record: ShardRecord, header: ManifestHeader, where: str, name: str) -> None:
    """A unit's row lengths: only in a documents store, each at most ``seq_len + 1``, and room for its trained
    positions (each row trains at most its ``L − 1`` input positions)."""
    if not header.masked:
        fail(where, f"{name}.lengths", list(record.lengths), "absent in a packed store (its rows all hold seq_len + 1 "
             "tokens)")
    for j, n in enumerate(record.lengths):
        if n > header.seq_len + 1:
            fail(where, f"{name}.lengths[{j}]", n, f"at most seq_len + 1 = {header.seq_len + 1}")
    inputs = sum(record.lengths) - record.sequences
    if record.positions > inputs:
        fail(where, f"{name}.positions", record.positions,
             f"at most the unit's input positions, sum(lengths) − sequences = {inputs}")


def generation_settings(header: ManifestHeader) -> dict | None:
    """The generation settings of a store of teacher-generated responses (``corpus.layout.generate``), else None."""
    layout = header.corpus.get("layout") if header.masked else None
    return layout.get("generate") if isinstance(layout, dict) else None


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
