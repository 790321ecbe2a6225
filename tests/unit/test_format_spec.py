"""docs/format.md describes the files as written: the documented Arrow shard schema equals the schema
of real shards, for every method, id code, logprob code and entropy stage, packed and ``documents``, with and
without the realized-token log-probabilities."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pytest

from helpers import make_config
from logitcache.capture import capture
from logitcache.store.spec import spec_from_manifest
from logitcache.store.writer import encode_unit
from logitcache.testing.store_conformance import VOCAB, make_header, make_rows
from logitcache.testing.targets import random_row

FORMAT_MD = Path(__file__).resolve().parents[2] / "docs" / "format.md"
TYPES = {"uint64": pa.uint64(), "binary": pa.binary()}


def documented_shard_table() -> list[tuple[str, str, str]]:
    """``(column, arrow type, stored when)`` rows of the "Shards (Arrow IPC stream)" table."""
    text = FORMAT_MD.read_text()
    section = text.split("## Shards (Arrow IPC stream)", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| (.+?) \|$", section, re.M)
    assert rows, "no table found under '## Shards (Arrow IPC stream)' in docs/format.md"
    return rows


def stored(condition: str, *, method: str, weighted: bool, ids: str, logprobs: str, entropy: str,
           masked: bool = False, generated: bool = False, labels: bool = False, totals: bool = False) -> bool:
    """Evaluate a documented "stored when" condition for one store configuration."""
    if condition == "always":
        return True
    if condition == "layout `documents`":
        return masked
    if condition == "generated responses (`corpus.layout.generate`)":
        return generated
    if condition == "under `ans`":
        return entropy == "ans"
    if condition == "realized-token log-probabilities (`encoding.label_logprobs`)":
        return labels
    clauses = [c.strip() for c in condition.split(";")]
    methods = re.fullmatch(r"method (.+)", clauses[0])
    assert methods, f"unparsed condition {condition!r} in docs/format.md"
    names, tau = methods.group(1), "τ ≠ 1" in methods.group(1)
    adaptive = "with an adaptive budget (`encoding.sample_totals`)" in names
    listed = re.findall(r"topk|sample|hybrid|full", names)
    ok = method in listed and (not tau or weighted) and (not adaptive or totals)
    for clause in clauses[1:]:
        m = re.fullmatch(r"not under `ans`(?: with (rank-delta ids|q8 logprobs))?", clause)
        assert m, f"unparsed clause {clause!r} in docs/format.md"
        qualifier = m.group(1)
        applies = entropy == "ans" and (qualifier is None or (qualifier == "rank-delta ids" and ids == "rank-delta")
                                        or (qualifier == "q8 logprobs" and logprobs == "q8"))
        ok = ok and not applies
    return ok


def documented_schema(**store) -> pa.Schema:
    return pa.schema([(name, TYPES[kind]) for name, kind, when in documented_shard_table() if stored(when, **store)])


CASES = [  # method, temperature, ids, logprobs, entropy
    ("sample", 1.0, "rank-delta", "float32", "zstd"),
    ("sample", 0.7, "packed", "float32", "zstd"),
    ("sample", 1.0, "rank-delta", "float32", "ans"),
    ("sample", 1.0, "packed", "float32", "ans"),
    ("topk", 1.0, "rank-delta", "q8", "ans"),
    ("topk", 1.0, "packed", "float16", "zstd"),
    ("hybrid", 1.0, "packed", "q8", "ans"),
    ("hybrid", 1.0, "rank-delta", "float32", "ans"),
    ("full", 1.0, "rank-delta", "float32", "zstd"),
]


@pytest.mark.parametrize("method, tau, ids, logprobs, entropy", CASES)
def test_real_shards_have_the_documented_schema(tiny_teacher, tmp_path, method, tau, ids, logprobs, entropy):
    over = {"store.ids": ids, "store.logprob_dtype": logprobs, "store.entropy": entropy,
            "corpus.max_tokens": 16 * 4, "store.sequences_per_shard": 2}
    if tau != 1.0:
        over["sparsify.temperature"] = tau
    capture(make_config(tiny_teacher, tmp_path / "s", method, **over), progress=False)
    shards = sorted((tmp_path / "s" / "shards").glob("*.arrow"))
    assert shards
    with pa.ipc.open_stream(pa.OSFile(str(shards[0]))) as reader:
        schema = reader.schema
    expected = documented_schema(method=method, weighted=tau != 1.0, ids=ids, logprobs=logprobs, entropy=entropy)
    assert schema.remove_metadata().equals(expected), f"{schema} != documented {expected}"


@pytest.mark.parametrize("method, tau, ids, logprobs, entropy", [CASES[1], CASES[2], CASES[4], CASES[7]])
def test_shards_with_label_logprobs_have_the_documented_schema(tiny_teacher, tmp_path, method, tau, ids, logprobs,
                                                               entropy):
    """``--label-logprobs`` adds ``label_logprob`` after the row columns (before ``entropy``), and nothing else."""
    over = {"store.ids": ids, "store.logprob_dtype": logprobs, "store.entropy": entropy, "store.label_logprobs": True,
            "corpus.max_tokens": 16 * 4, "store.sequences_per_shard": 2, "sparsify.temperature": tau}
    capture(make_config(tiny_teacher, tmp_path / "s", method, **over), progress=False)
    with pa.ipc.open_stream(pa.OSFile(str(sorted((tmp_path / "s" / "shards").glob("*.arrow"))[0]))) as reader:
        schema = reader.schema
    store = dict(method=method, weighted=tau != 1.0, ids=ids, logprobs=logprobs, entropy=entropy)
    expected = documented_schema(**store, labels=True)
    assert schema.remove_metadata().equals(expected), f"{schema} != documented {expected}"
    without = documented_schema(**store).names
    assert [n for n in expected.names if n not in without] == ["label_logprob"]


@pytest.mark.parametrize("method, entropy", [("sample", "zstd"), ("hybrid", "ans")])
def test_shards_with_an_adaptive_budget_have_the_documented_schema(tiny_teacher, tmp_path, method, entropy):
    """``--sample-allocation variance`` adds ``sample_totals`` where the table says, and nothing else."""
    over = {"store.entropy": entropy, "sparsify.allocation": "variance", "corpus.max_tokens": 16 * 4,
            "store.sequences_per_shard": 2}
    capture(make_config(tiny_teacher, tmp_path / "s", method, **over), progress=False)
    with pa.ipc.open_stream(pa.OSFile(str(sorted((tmp_path / "s" / "shards").glob("*.arrow"))[0]))) as reader:
        schema = reader.schema
    store = dict(method=method, weighted=False, ids="rank-delta", logprobs="float32", entropy=entropy)
    expected = documented_schema(**store, totals=True)
    assert schema.remove_metadata().equals(expected), f"{schema} != documented {expected}"
    assert [n for n in expected.names if n not in documented_schema(**store).names] == ["sample_totals"]


def test_a_drifted_table_is_caught():
    """The comparison is sharp: dropping one documented condition changes the expected schema."""
    plain = documented_schema(method="sample", weighted=False, ids="rank-delta", logprobs="float32", entropy="ans")
    weighted = documented_schema(method="sample", weighted=True, ids="rank-delta", logprobs="float32", entropy="ans")
    assert "sample_lengths" not in plain.names and "entropy" in plain.names
    assert weighted.names == plain.names[:-1] + ["sample_weights", "entropy"]


@pytest.mark.parametrize("method, tau, ids, logprobs, entropy", CASES)
def test_documents_shards_have_the_documented_schema(method, tau, ids, logprobs, entropy):
    """A ``documents`` store's shard (masked rows, written as a capture writes them) has the documented columns."""
    weighted = tau != 1.0
    header = dataclasses.replace(make_header(method, "arrow", sequences=2, per_shard=2, ids=ids, logprobs=logprobs,
                                             entropy=entropy, weighted=weighted, seq_len=6), layout="documents")
    rows = make_rows(method, 2, 6, seed=1, weighted=weighted)  # six positions each
    half = random_row(method, 3, VOCAB, seed=2, k=4, weighted=weighted)[1]  # compact targets of row 0's mask
    masks = [np.arange(6) % 2 == 0, np.ones(6, bool)]
    _, objects = encode_unit(spec_from_manifest(header), 0, [r[0] for r in rows], [r[1] for r in rows],
                             [half, rows[1][2]], masks)
    schema = pa.ipc.open_stream(pa.py_buffer(objects[0][1])).schema
    expected = documented_schema(method=method, weighted=weighted, ids=ids, logprobs=logprobs, entropy=entropy,
                                 masked=True)
    assert schema.remove_metadata().equals(expected), f"{schema} != documented {expected}"
    assert expected.names[:3] == ["seq_id", "tokens", "train_mask"]


def test_generated_shards_have_the_documented_schema(tiny_teacher, tmp_path):
    """A store of teacher-generated responses adds the finish_reason column where the table says."""
    from helpers import write_chat_corpus

    path, template = write_chat_corpus(tmp_path)
    capture(make_config(tiny_teacher, tmp_path / "s", "hybrid", **{
        "corpus.source": str(path), "corpus.max_tokens": None, "corpus.seq_len": 120,
        "corpus.chat_template": str(template), "generate.max_new_tokens": 4}), progress=False)
    with pa.ipc.open_stream(pa.OSFile(str(sorted((tmp_path / "s" / "shards").glob("*.arrow"))[0]))) as reader:
        schema = reader.schema
    expected = documented_schema(method="hybrid", weighted=False, ids="rank-delta", logprobs="float32",
                                 entropy="zstd", masked=True, generated=True)
    assert "finish_reason" in expected.names and schema.remove_metadata().equals(expected)
