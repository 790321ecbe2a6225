"""``inspect`` of a store of teacher-generated responses sums the counts each unit's record keeps (written at
commit) instead of reading every row: checked against the responses read back and counted by hand, against the
row-reading path a store written before the counts keeps (its records stripped of them, all or some), and by
``verify``, which compares the records with the rows. A record's counts are checked on read like its other fields.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from helpers import make_config, write_chat_corpus
from logitcache.capture.export import iter_generated
from logitcache.capture.pipeline import capture_local
from logitcache.errors import StoreError
from logitcache.store import inspect_store, read_manifest, verify_store
from logitcache.store.generations import inspect_section
from logitcache.store.manifest import generation_settings
from logitcache.store.spec import spec_from_manifest

STOPS = ["e", "never-there"]


@pytest.fixture(scope="module")
def generated(tiny_teacher, tmp_path_factory) -> Path:
    """A tiny-teacher generated store: 3 prompts × 2 responses of up to 12 tokens, 2 rows per unit, two stop
    strings (one that ends responses, one that never occurs)."""
    work = tmp_path_factory.mktemp("generated")
    corpus, template = write_chat_corpus(work)
    config = make_config(tiny_teacher, work / "store", method="topk", **{
        "corpus.source": str(corpus), "corpus.max_tokens": None, "corpus.seq_len": 180,
        "corpus.chat_template": str(template), "store.sequences_per_shard": 2,
        "generate.max_new_tokens": 12, "generate.n": 2, "generate.stop": STOPS})
    return Path(capture_local(config, progress=False).store)


@pytest.fixture
def store(generated, tmp_path) -> Path:
    return Path(shutil.copytree(generated, tmp_path / "copy"))


def by_hand(root: Path) -> dict:
    """The generation statistics of the stored responses, read back row by row and counted here."""
    rows = list(iter_generated(root))
    lengths = [row.response.size for row in rows]
    reasons = Counter(row.finish for row in rows)
    hits = Counter(row.stop_string for row in rows if row.finish == "stop-string")
    return {"responses": len(rows), "mean_response_tokens": sum(lengths) / len(lengths),
            "max_response_tokens": max(lengths),
            "finish_reasons": {r: reasons[r] for r in ("stop", "length", "stop-string")},
            "stop_string_hits": {s: hits[i] for i, s in enumerate(STOPS)}}


def section(root: Path) -> dict:
    summary = inspect_store(root)
    assert summary["problems"] == []
    return {k: v for k, v in summary["generation"].items() if k != "settings"}


def edit_records(root: Path, change) -> None:
    """Apply ``change`` to every unit record of the manifest (``change(i, record)``), as an older or damaged
    writer would have left them."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    for i, record in enumerate(manifest["shards"]):
        change(i, record)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def test_the_records_counts_give_what_the_rows_hold(generated):
    expected = by_hand(generated)
    reasons = expected["finish_reasons"]
    assert reasons["stop-string"] > 0 and reasons["length"] > 0  # the store exercises more than one reason
    assert expected["stop_string_hits"]["never-there"] == 0
    assert section(generated) == expected
    records = read_manifest(generated).shards
    assert all(r.generation is not None for r in records)
    assert sum(r.generation.response_tokens for r in records) == sum(r.positions for r in records)


def test_inspect_reads_no_unit_when_the_records_hold_the_counts(generated):
    manifest = read_manifest(generated)

    def read(record):
        raise AssertionError(f"inspect read unit {record.index}")

    found, problems = inspect_section(spec_from_manifest(manifest.header), generation_settings(manifest.header),
                                      manifest.shards, read)
    assert problems == [] and found["generation"]["responses"] == len(list(iter_generated(generated)))


@pytest.mark.parametrize("stripped", ["all", "some"])
def test_a_store_written_before_the_counts_reads_its_rows(store, stripped):
    expected = by_hand(store)
    edit_records(store, lambda i, r: r.pop("generation") if stripped == "all" or i % 2 else None)
    assert (read_manifest(store).shards[0].generation is None) == (stripped == "all")
    assert section(store) == expected
    assert verify_store(store).ok


def test_verify_refuses_records_whose_counts_are_not_the_rows(store):
    def miscount(i, record):  # one response moved from its finish code to another, the sum kept
        if i == 0:
            codes = record["generation"]["finish_codes"]
            source = next(c for c, n in enumerate(codes) if n)
            codes[source] -= 1
            codes[1 - source if source < 2 else 0] += 1

    edit_records(store, miscount)
    report = verify_store(store)
    assert [p for p in report.problems if "shard 0: its rows hold" in p and "generation counts record" in p]
    assert len(report.problems) == 1


@pytest.mark.parametrize("change,match", [
    (lambda g: g["finish_codes"].append(1),
     r"manifest\.json: sum of shards\[0\]\.generation\.finish_codes is 3; expected the unit's sequences, 2"),
    (lambda g: g.update(response_tokens=g["max_response_tokens"] * 2 + 1),
     r"generation\.response_tokens is \d+; expected from max_response_tokens = \d+ to 2 × that"),
    (lambda g: g.update(finish_codes=[]), r"generation\.finish_codes is \[\]; expected a list of 1 to 256"),
    (lambda g: g.pop("max_response_tokens"), r"generation\.max_response_tokens is missing"),
    (lambda g: g.update(response_tokens=-1), r"generation\.response_tokens is -1; expected an integer"),
])
def test_bad_counts_are_refused_naming_the_field(store, change, match):
    edit_records(store, lambda i, r: change(r["generation"]) if i == 0 else None)
    with pytest.raises(StoreError, match=match):
        read_manifest(store)


def test_counts_naming_an_unlisted_stop_string_are_a_problem(store):
    edit_records(store, lambda i, r: r["generation"].update(finish_codes=[0, 0, 0, 0, 2]) if i == 0 else None)
    problems = inspect_store(store)["problems"]
    assert problems == ["generation statistics: shard 0: its record counts 2 responses with finish code 4 (stop "
                        "string 2); the store's settings list 2 (codes 0 .. 3 expected)"]
