"""Structural checks of a manifest and its shard entries, before any reader trusts a number in them.

A manifest is JSON that anyone can edit, so every field a reader uses is checked for presence,
type and range here, with one error naming the field, the value found and what was expected.
Shard contents are checked elsewhere (checksums); this module only guards the bookkeeping:
indices unique and within the plan, counts non-negative and bounded, positions equal to
``sequences · seq_len``. Paths escaping the store are refused per shard when opened
(:func:`logitcache.store.reader.object_path`), so `verify` can name each one.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ..errors import StoreError
from ..targets import METHODS

MAX_COUNT = 1 << 48  # bytes, sequences, positions, entries of one shard or one store
MAX_SEQ_LEN = 1 << 24  # positions per window; far beyond any teacher's context
_SHA256 = re.compile(r"[0-9a-f]{64}")
HEADER_DIGEST = "header_sha256"
_NOT_HEADER = ("shards", "complete", HEADER_DIGEST)
_HINT = "The manifest is damaged or was not written by logitcache: run `logitcache verify`, or recapture."


def _fail(where: str, name: str, value: Any, expected: str) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise StoreError(f"{where}: {name} is {shown}; expected {expected}. {_HINT}")


def _int(where: str, name: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        _fail(where, name, value, f"an integer in [{low}, {high}]")
    return value


def _mapping(where: str, name: str, value: Any, keys: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        _fail(where, name, value, "a mapping")
    for key in keys:
        if key not in value:
            raise StoreError(f"{where}: {name}.{key} is missing. {_HINT}")
    return value


def check_shard_entry(entry: Any, where: str, name: str = "shard") -> dict:
    """One unit entry (a manifest ``shards[i]`` or a commit record): fields, types, ranges, its objects."""
    _mapping(where, name, entry, ("index", "sequences", "positions", "entries", "objects"))
    _int(where, f"{name}.index", entry["index"], 0, MAX_COUNT)
    for key in ("sequences", "positions", "entries"):
        _int(where, f"{name}.{key}", entry[key], 0, MAX_COUNT)
    for key in ("max_logprob_error", "max_prob_error"):
        value = entry.get(key, 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
            _fail(where, f"{name}.{key}", value, "a number >= 0")
    objects = entry["objects"]
    if not isinstance(objects, list) or not 1 <= len(objects) <= 1024:
        _fail(where, f"{name}.objects", objects, "a list of 1 to 1024 object entries")
    for j, obj in enumerate(objects):
        oname = f"{name}.objects[{j}]"
        _mapping(where, oname, obj, ("path", "bytes", "sha256"))
        _int(where, f"{oname}.bytes", obj["bytes"], 0, MAX_COUNT)
        if not isinstance(obj["sha256"], str) or not _SHA256.fullmatch(obj["sha256"]):
            _fail(where, f"{oname}.sha256", obj["sha256"], "64 lowercase hex digits")
        if not isinstance(obj["path"], str) or not obj["path"]:
            _fail(where, f"{oname}.path", obj["path"], "a path such as 'shards/00000.arrow'")
    return entry  # whether a path stays inside the store is checked per unit when it is read


def header_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON of every manifest field except ``shards``, ``complete`` and itself."""
    header = {k: v for k, v in manifest.items() if k not in _NOT_HEADER}
    return hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_header_digest(header: dict) -> dict:
    """``header`` plus its :func:`header_digest`, so an edited or bit-flipped header is detected."""
    return {**header, HEADER_DIGEST: header_digest(header)}


def check_manifest(manifest: dict, where: str) -> None:
    """Header digest; every field readers use; shard entries consistent with the plan and each other."""
    _mapping(where, "manifest", manifest)
    found = manifest.get(HEADER_DIGEST)
    if found != header_digest(manifest):
        _fail(where, HEADER_DIGEST, found, f"{header_digest(manifest)}, the sha256 of the header fields "
              "(a header field was changed after the capture wrote it)")
    _mapping(where, "manifest", manifest, ("method", "params", "head_size", "identity", "teacher",
                                           "tokenizer", "corpus", "seq_len", "plan", "store", "shards"))
    if manifest["method"] not in METHODS:
        _fail(where, "method", manifest["method"], f"one of {', '.join(METHODS)}")
    _mapping(where, "params", manifest["params"])
    _mapping(where, "identity", manifest["identity"], ("seed",))
    _mapping(where, "teacher", manifest["teacher"])
    _mapping(where, "corpus", manifest["corpus"])
    _mapping(where, "store", manifest["store"], ("format", "compression", "compression_level", "encoding"))
    _mapping(where, "store.encoding", manifest["store"]["encoding"])
    _int(where, "store.compression_level", manifest["store"]["compression_level"], 0, 22)
    fingerprint = _mapping(where, "tokenizer", manifest["tokenizer"], ("fingerprint",))["fingerprint"]
    if not isinstance(fingerprint, str):
        _fail(where, "tokenizer.fingerprint", fingerprint, "a string")
    _int(where, "head_size", manifest["head_size"], 0, MAX_SEQ_LEN)
    seq_len = _int(where, "seq_len", manifest["seq_len"], 1, MAX_SEQ_LEN)
    plan = _mapping(where, "plan", manifest["plan"], ("shards", "sequences", "sequences_per_shard"))
    planned = _int(where, "plan.shards", plan["shards"], 0, MAX_COUNT)
    _int(where, "plan.sequences", plan["sequences"], 0, MAX_COUNT)
    _int(where, "plan.sequences_per_shard", plan["sequences_per_shard"], 1, MAX_COUNT)
    shards = manifest["shards"]
    if not isinstance(shards, list):
        _fail(where, "shards", shards, "a list of shard entries")
    seen: set[int] = set()
    for i, entry in enumerate(shards):
        name = f"shards[{i}]"
        check_shard_entry(entry, where, name)
        index = entry["index"]
        if index >= planned or index in seen:
            _fail(where, f"{name}.index", index, f"a unique index below plan.shards = {planned}")
        seen.add(index)
        if entry["positions"] != entry["sequences"] * seq_len:
            _fail(where, f"{name}.positions", entry["positions"],
                  f"sequences × seq_len = {entry['sequences']} × {seq_len}")
    total = sum(e["sequences"] for e in shards)
    if total > plan["sequences"]:
        _fail(where, "sum of shards[].sequences", total, f"at most plan.sequences = {plan['sequences']}")
