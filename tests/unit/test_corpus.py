"""Corpus readers: every format, the one-file-one-document rule, and every bad-input message."""

from __future__ import annotations

import json

import pytest

from logitcache.capture.corpus import Document, read_documents
from logitcache.errors import CorpusError
from logitcache.testing.tiny import write_jsonl, write_parquet, write_text_corpus

DOCS = ["first doc\n\nwith a blank line", "second ✓ doc", "", "third"]


def texts(source: str, **kw) -> list[str]:
    return [d.text for d in read_documents(source, **kw)]


def test_builtin_pydoc_one_document_per_topic_sorted():
    from pydoc_data.topics import topics

    docs = list(read_documents("builtin:pydoc"))
    assert len(docs) == len(topics) > 50
    assert [d.origin for d in docs] == [f"pydoc:{k}" for k in sorted(topics)]
    assert all(isinstance(d, Document) and d.text == topics[d.origin[6:]] for d in docs)


def test_builtin_stdlib_is_the_standard_library_sources_sorted_without_tests():
    """Checked against the file system read independently: os.walk, not the reader's rglob."""
    import hashlib
    import os
    import platform
    import sysconfig

    from logitcache.capture.corpus import open_corpus

    root = sysconfig.get_paths()["stdlib"]
    expected = sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, fs in os.walk(root)
                      for f in fs if f.endswith(".py"))
    expected = [n for n in expected if not {"test", "tests", "idle_test", "site-packages"} & set(n.split("/"))
                and not n.startswith(("_sysconfigdata", "config-"))]
    corpus = open_corpus("builtin:stdlib")
    docs = list(corpus.documents())
    assert [d.origin for d in docs] == [f"stdlib:{n}" for n in expected] and len(docs) > 500
    assert "stdlib:json/decoder.py" in {d.origin for d in docs} and "stdlib:test/test_json.py" not in expected
    with open(os.path.join(root, "json", "decoder.py"), encoding="utf-8", newline="") as handle:
        assert next(d.text for d in docs if d.origin == "stdlib:json/decoder.py") == handle.read()
    assert sum(len(d.text) for d in docs) > 5_000_000
    about = corpus.manifest_input()
    assert about["python"] == platform.python_version() and about["stdlib_files"] == len(expected)
    assert about["files_sha256"] == hashlib.sha256("\n".join(expected).encode()).hexdigest()


def test_unknown_builtin_lists_known():
    with pytest.raises(CorpusError, match="builtin:pydoc"):
        read_documents("builtin:nope")


def test_text_file_is_one_document(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("para one\n\npara two\n\n\nthree", encoding="utf-8")
    docs = list(read_documents(str(p)))
    assert docs == [Document("para one\n\npara two\n\n\nthree", str(p))]


def test_text_directory_recursive_sorted_by_relative_path(tmp_path):
    write_text_corpus(tmp_path / "b", ["B0", "B1"])
    (tmp_path / "a.md").write_text("A markdown", encoding="utf-8")
    (tmp_path / "z.txt").write_text("Z", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y", encoding="utf-8")
    docs = list(read_documents(str(tmp_path)))
    assert [d.origin for d in docs] == ["a.md", "b/doc_000.txt", "b/doc_001.txt", "z.txt"]
    assert [d.text for d in docs] == ["A markdown", "B0", "B1", "Z"]


def test_text_keeps_empty_files_as_documents(tmp_path):
    write_text_corpus(tmp_path, DOCS)
    assert texts(str(tmp_path)) == DOCS


def test_jsonl_reader_with_origin_lines(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", DOCS, field="body")
    with p.open("a", encoding="utf-8") as f:
        f.write("\n   \n")  # blank lines are skipped
        f.write(json.dumps({"body": "last", "other": 1}) + "\n")
    docs = list(read_documents(str(p), text_field="body"))
    assert [d.text for d in docs] == DOCS + ["last"]
    assert docs[0].origin == f"{p}:1" and docs[-1].origin == f"{p}:7"


def test_json_suffix_is_json_lines(tmp_path):
    p = write_jsonl(tmp_path / "c.json", ["x", "y"])
    assert texts(str(p)) == ["x", "y"]


def test_parquet_file_and_directory(tmp_path):
    p = write_parquet(tmp_path / "one.parquet", DOCS, field="content")
    docs = list(read_documents(str(p), text_field="content"))
    assert [d.text for d in docs] == DOCS and docs[1].origin == f"{p}:1"
    d = tmp_path / "dir"
    write_parquet(d / "part-1.parquet", ["p1"])
    write_parquet(d / "part-0.parquet", ["p0a", "p0b"])
    docs = list(read_documents(str(d)))
    assert [(x.text, x.origin) for x in docs] == [
        ("p0a", "part-0.parquet:0"),
        ("p0b", "part-0.parquet:1"),
        ("p1", "part-1.parquet:0"),
    ]


def test_hf_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert texts(str(tmp_path / "ds")) == DOCS
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([3, 1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    docs = list(read_documents(str(tmp_path / "dd"), split="validation"))
    assert [d.text for d in docs] == ["third", "second ✓ doc"]
    assert docs[0].origin.endswith("[validation]:0")
    with pytest.raises(CorpusError, match=r"no split 'test'.*'train', 'validation'"):
        read_documents(str(tmp_path / "dd"), split="test")
    with pytest.raises(CorpusError, match=r"no column 'body'.*'text', 'n'"):
        read_documents(str(tmp_path / "ds"), text_field="body")


def test_missing_path(tmp_path):
    with pytest.raises(CorpusError, match=r"does not exist.*builtin:pydoc"):
        read_documents(str(tmp_path / "nope.txt"))


def test_unknown_format_lists_supported(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"unknown corpus format.*'\.csv'.*\.jsonl.*\.parquet.*save_to_disk"):
        read_documents(str(p))


def test_directory_without_corpus_files(tmp_path):
    (tmp_path / "x.csv").write_text("1", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"no corpus files.*\*\.txt"):
        read_documents(str(tmp_path))


def test_directory_with_text_and_parquet_is_ambiguous(tmp_path):
    write_text_corpus(tmp_path, ["a"])
    write_parquet(tmp_path / "p.parquet", ["b"])
    with pytest.raises(CorpusError, match=r"2 kinds: parquet \(1: p\.parquet\); text \(1: doc_000\.txt\)"):
        read_documents(str(tmp_path))


def test_non_utf8_text_names_file_and_offset(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes("héllo ".encode() + b"\xff rest")
    with pytest.raises(CorpusError) as err:
        list(read_documents(str(p)))
    message = str(err.value)
    assert "bad.txt" in message and "byte offset 7" in message and "0xff" in message and "UTF-8" in message


def test_non_utf8_jsonl_names_line_and_absolute_offset(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl line 2.*byte offset 25"):
        list(read_documents(str(p)))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", r"bad\.jsonl:2: line is not valid JSON"),
        ('{"body": "x"}', r"bad\.jsonl:2: object has no 'text' key \(keys: 'body'\)"),
        ('{"text": 3}', r"bad\.jsonl:2: field 'text' is a int, expected a string"),
        ('["text"]', r"bad\.jsonl:2: found a JSON list, expected an object"),
    ],
)
def test_bad_jsonl_lines(tmp_path, line, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=expected):
        list(read_documents(str(p)))


def test_parquet_without_column_lists_columns(tmp_path):
    p = write_parquet(tmp_path / "t.parquet", ["a"], field="content")
    with pytest.raises(CorpusError, match=r"no column 'text'; it has columns 'content'"):
        read_documents(str(p))


def test_parquet_non_string_column_and_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(CorpusError, match="expected a string column"):
        read_documents(str(tmp_path / "ints.parquet"))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(CorpusError, match=r"nulls\.parquet:1: 'text' is null"):
        list(read_documents(str(tmp_path / "nulls.parquet")))


def test_not_parquet_bytes(tmp_path):
    p = tmp_path / "fake.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match="cannot be read as Parquet"):
        read_documents(str(p))


# ---------------------------------------------------------------- a large text file is read in pieces (#19 item 3)

TRICKY = "ab\r\n€x\r\r\n😀\rq\n\n" * 40 + "é"  # CRLF, lone CR and LF, 2-, 3- and 4-byte characters


def line_ends(text: str) -> dict[str, int]:
    import re

    return {"lf": len(re.findall(r"(?<!\r)\n", text)), "crlf": len(re.findall(r"\r\n", text)),
            "cr": len(re.findall(r"\r(?!\n)", text))}


@pytest.mark.parametrize("piece_bytes", [1, 2, 3, 4, 5, 6, 7, 8, 9, 64, 257])
@pytest.mark.parametrize("bom", [False, True])
def test_a_large_text_file_is_read_in_pieces_cut_between_characters_and_never_inside_crlf(
        tmp_path, monkeypatch, piece_bytes, bom):
    from logitcache.capture import corpus as corpus_module
    from logitcache.capture.corpus import TextFileDocument, open_corpus

    monkeypatch.setattr(corpus_module, "PIECE_BYTES", piece_bytes)
    path = tmp_path / "big.txt"
    path.write_bytes(b"\xef\xbb\xbf" * bom + TRICKY.encode())
    corpus = open_corpus(str(path))
    (doc,) = corpus.documents()
    assert isinstance(doc, TextFileDocument) and doc.size == len(TRICKY.encode()) and doc.origin == str(path)
    pieces = list(doc.pieces())
    assert "".join(pieces) == TRICKY and all(pieces)
    assert all(len(p.encode()) <= piece_bytes + 4 for p in pieces)  # a piece, plus at most the character cut off before
    assert not any(a.endswith("\r") and b.startswith("\n") for a, b in zip(pieces, pieces[1:]))
    assert corpus.manifest_input()["newlines"] == line_ends(TRICKY)
    assert corpus.manifest_input()["bom_stripped"] == bom


@pytest.mark.parametrize(("data", "offset"), [(b"a" * 1000 + b"\xff rest", 1000),
                                              (b"\xef\xbb\xbf" + b"a" * 1000 + b"\xff rest", 1003),
                                              ("é".encode() * 600 + b"\xc3(", 1200),
                                              (b"a" * 1000 + "€".encode()[:2], 1000)])  # a character cut by the end
def test_a_large_text_file_not_utf8_names_file_and_absolute_offset(tmp_path, monkeypatch, data, offset):
    from logitcache.capture import corpus as corpus_module

    monkeypatch.setattr(corpus_module, "PIECE_BYTES", 64)
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    (doc,) = read_documents(str(path))
    with pytest.raises(CorpusError, match=rf"bad\.txt: byte 0x[0-9a-f]{{2}} at byte offset {offset} is not valid UTF-8"):
        list(doc.pieces())


def test_a_large_text_file_that_changes_while_read_is_refused(tmp_path, monkeypatch):
    from logitcache.capture import corpus as corpus_module

    monkeypatch.setattr(corpus_module, "PIECE_BYTES", 64)
    path = tmp_path / "grows.txt"
    path.write_text("x" * 1000)
    (doc,) = read_documents(str(path))
    with path.open("a") as handle:
        handle.write("more")
    with pytest.raises(CorpusError, match=r"grows\.txt: 1004 bytes read, expected 1000 .*changed during capture"):
        list(doc.pieces())
