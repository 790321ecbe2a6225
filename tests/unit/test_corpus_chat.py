"""Chat corpora in the corpus reader: which corpora hold conversations, their rows in order, and bad rows."""

from __future__ import annotations

import json

import pytest

from logitcache.capture import corpus as corpus_module
from logitcache.capture.chat import conversation_from_row, pydoc_chat_rows
from logitcache.capture.corpus import open_corpus
from logitcache.errors import CorpusError
from logitcache.testing.tiny import write_jsonl, write_parquet, write_text_corpus

MESSAGES = [
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"},
                  {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "user", "content": "no answer here"}]},
]
SHAREGPT = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q2"},
                               {"from": "gpt", "value": "a2"}]}]
PROMPT_COMPLETION = [{"prompt": "Capital of France?", "completion": "Paris."}, {"prompt": "1 + 1?", "completion": "2"}]
PROMPT_COMPLETION_LISTS = [{"prompt": [{"role": "user", "content": "a"}],
                            "completion": [{"role": "assistant", "content": "b"}]}]
CHAT_ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def write_rows(path, rows, prefix: str = ""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prefix + "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet_rows(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    keys = dict.fromkeys(key for row in rows for key in row)  # from_pylist takes its columns from the first row
    pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in keys} for row in rows]), path)
    return path


def save_dataset(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------- which corpora hold conversations


@pytest.mark.parametrize("rows", [MESSAGES, SHAREGPT, PROMPT_COMPLETION, PROMPT_COMPLETION_LISTS],
                         ids=["messages", "sharegpt", "prompt", "prompt-lists"])
@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "hf"])
def test_every_source_kind_with_conversation_rows_is_chat(tmp_path, kind, rows):
    path = {"jsonl": lambda: write_rows(tmp_path / "c.jsonl", rows),
            "json": lambda: write_rows(tmp_path / "c.json", rows),
            "parquet": lambda: write_parquet_rows(tmp_path / "c.parquet", rows),
            "hf": lambda: save_dataset(tmp_path / "ds", rows)}[kind]()
    corpus = open_corpus(str(path))
    assert corpus.chat and corpus.kind == kind
    corpus.check()
    assert len(list(corpus.rows())) == len(rows)


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet", "hf"])
def test_text_corpora_of_every_kind_stay_text(tmp_path, kind):
    docs = ["one", "two"]
    path = {"text": lambda: write_text_corpus(tmp_path, docs)[0],
            "jsonl": lambda: write_jsonl(tmp_path / "t.jsonl", docs),
            "parquet": lambda: write_parquet(tmp_path / "t.parquet", docs),
            "hf": lambda: save_dataset(tmp_path / "ds", [{"text": d} for d in docs])}[kind]()
    corpus = open_corpus(str(path))
    assert not corpus.chat
    assert "rows" not in corpus.manifest_input()


def test_builtins_pydoc_is_text_and_pydoc_chat_rows_are_pydoc_chat_rows():
    assert not open_corpus("builtin:pydoc").chat
    corpus = open_corpus("builtin:pydoc-chat")
    assert corpus.chat and corpus.kind == "builtin"
    corpus.check()
    rows = list(corpus.rows())
    assert rows == list(pydoc_chat_rows()) and len(rows) > 50
    assert rows[0][0].startswith("pydoc-chat:") and corpus.manifest_input()["rows"] == "chat"


def test_the_text_field_wins_over_conversation_fields(tmp_path):
    """A row with the text field is text as today (its other keys unread); a null text field counts as absent."""
    both = write_rows(tmp_path / "both.jsonl", [{"text": "t", **CHAT_ROW}])
    assert not open_corpus(str(both)).chat and [d.text for d in open_corpus(str(both)).documents()] == ["t"]
    assert open_corpus(str(both), text_field="body").chat  # no 'body': the conversation fields decide
    null_text = write_rows(tmp_path / "null.jsonl", [{"text": None, **CHAT_ROW}])
    assert open_corpus(str(null_text)).chat
    parquet = write_parquet_rows(tmp_path / "p.parquet", [{"text": "t", **CHAT_ROW}])
    assert not open_corpus(str(parquet)).chat and open_corpus(str(parquet), text_field="body").chat


def test_the_first_non_blank_line_decides(tmp_path):
    path = write_rows(tmp_path / "c.jsonl", MESSAGES, prefix="\n   \n")
    corpus = open_corpus(str(path))
    assert corpus.chat and [origin for origin, _ in corpus.rows()] == [f"{path}:3", f"{path}:4", f"{path}:5"]


# ---------------------------------------------------------------- rows and origins in order


def test_jsonl_directory_rows_in_order_with_origins_and_bom(tmp_path):
    write_rows(tmp_path / "b.jsonl", SHAREGPT)
    write_rows(tmp_path / "a" / "x.jsonl", MESSAGES[:2], prefix="\ufeff")
    with (tmp_path / "a" / "x.jsonl").open("a", encoding="utf-8") as handle:
        handle.write("\n" + json.dumps(MESSAGES[2]) + "\n")
    (tmp_path / "README.md").write_text("# card")
    corpus = open_corpus(str(tmp_path))
    corpus.check()
    assert list(corpus.rows()) == [("a/x.jsonl:1", MESSAGES[0]), ("a/x.jsonl:2", MESSAGES[1]),
                                   ("a/x.jsonl:4", MESSAGES[2]), ("b.jsonl:1", SHAREGPT[0]), ("b.jsonl:2", SHAREGPT[1])]
    found = corpus.manifest_input()
    assert found["files"] == ["a/x.jsonl", "b.jsonl"] and found["skipped"] == ["README.md (documentation)"]
    assert found["bom_stripped"] == 1 and found["rows"] == "chat" and found["kind"] == "jsonl"


def test_parquet_directory_rows_are_plain_dicts_in_order(tmp_path):
    import pyarrow.parquet as pq

    write_parquet_rows(tmp_path / "part-1.parquet", PROMPT_COMPLETION[:1])
    write_parquet_rows(tmp_path / "part-0.parquet", MESSAGES)
    rows = list(open_corpus(str(tmp_path)).rows())
    assert [origin for origin, _ in rows] == ["part-0.parquet:0", "part-0.parquet:1", "part-0.parquet:2",
                                              "part-1.parquet:0"]
    assert [row for _, row in rows] == MESSAGES + PROMPT_COMPLETION[:1]
    assert all(type(row) is dict and type(row.get("messages", [])) is list for _, row in rows)
    with_extra = [{"messages": [{"role": "user", "content": "q", "name": "ann"}]},
                  {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}]
    path = write_parquet_rows(tmp_path / "extra.parquet", with_extra)
    _, (_, second) = open_corpus(str(path)).rows()
    assert second["messages"][0] == {"role": "user", "content": "q2", "name": None}  # Arrow gives every struct key
    assert second == pq.read_table(path).to_pylist()[1]


def test_parquet_rows_carry_every_column_a_row_shape_needs_and_no_other(tmp_path):
    rows = [{"id": 1, "text": None, "prompt": "p", "completion": "c", "meta": {"x": 1}},
            {"id": 2, "text": "t", "prompt": "p2", "completion": "c2", "meta": None}]
    path = write_parquet_rows(tmp_path / "pc.parquet", rows)
    assert not open_corpus(str(path)).chat  # it has the text field's column: a text corpus, as today
    corpus = open_corpus(str(path), text_field="body")
    assert corpus.chat and list(corpus.rows()) == [(f"{path}:0", {"text": None, "prompt": "p", "completion": "c"}),
                                                   (f"{path}:1", {"text": "t", "prompt": "p2", "completion": "c2"})]
    with pytest.raises(CorpusError, match=rf"^{path}:1: row has both 'text' and 'prompt' and 'completion'"):
        corpus.check()


def test_hf_dataset_and_dataset_dict_rows(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(MESSAGES)
    save_dataset(tmp_path / "ds", MESSAGES)
    corpus = open_corpus(str(tmp_path / "ds"))
    assert list(corpus.rows()) == [(f"{tmp_path / 'ds'}[train]:{i}", row) for i, row in enumerate(MESSAGES)]
    datasets.DatasetDict({"train": ds, "validation": ds.select([2, 0])}).save_to_disk(str(tmp_path / "dd"))
    rows = list(open_corpus(str(tmp_path / "dd"), split="validation").rows())
    where = f"{tmp_path / 'dd'}[validation]"
    assert rows == [(f"{where}:0", MESSAGES[2]), (f"{where}:1", MESSAGES[0])]


def test_rows_become_conversations(tmp_path):
    path = write_rows(tmp_path / "sg.jsonl", SHAREGPT)
    chats = [conversation_from_row(row, where=origin) for origin, row in open_corpus(str(path)).rows()]
    assert [[m.role for m in c.messages] for c in chats] == [["user", "assistant"], ["system", "user", "assistant"]]
    path = write_parquet_rows(tmp_path / "pc.parquet", PROMPT_COMPLETION)
    chat, _ = [conversation_from_row(row, where=origin) for origin, row in open_corpus(str(path)).rows()]
    assert [m.content for m in chat.messages] == ["Capital of France?", "Paris."] and chat.completion_start == 1


# ---------------------------------------------------------------- bad rows, refused before a teacher loads


def test_mixed_text_and_messages_rows_are_refused_naming_the_line(tmp_path):
    path = write_rows(tmp_path / "mixed.jsonl", [MESSAGES[0], MESSAGES[1], {"text": "plain"}])
    with pytest.raises(CorpusError, match=rf"^{path}:3: this is a 'text' row but earlier rows of the file are "
                                          r"'messages' rows; expected one kind of row per file"):
        open_corpus(str(path)).check()
    path = write_rows(tmp_path / "text_first.jsonl", [{"text": "plain"}, MESSAGES[0]])
    with pytest.raises(CorpusError, match=rf"^{path}:2: line holds a conversation \('messages'\) but earlier lines "
                                          r"are text \('text'\); expected one kind of row per file"):
        list(open_corpus(str(path)).documents())


def test_each_file_has_its_own_shape(tmp_path):
    write_rows(tmp_path / "a.jsonl", MESSAGES)
    write_rows(tmp_path / "b.jsonl", SHAREGPT)
    open_corpus(str(tmp_path)).check()
    write_rows(tmp_path / "b.jsonl", SHAREGPT + PROMPT_COMPLETION[:1])
    with pytest.raises(CorpusError, match=r"^b\.jsonl:3: this is a 'prompt-completion' row but earlier rows of the "
                                          r"file are 'sharegpt' rows"):
        open_corpus(str(tmp_path)).check()


@pytest.mark.parametrize(("line", "expected"), [
    ('["messages"]', r"c\.jsonl:2: found a JSON list, expected an object with a 'messages', 'conversations' or "
                     r"'prompt'/'completion' field"),
    ("{not json", r"c\.jsonl:2: line is not valid JSON"),
    ('{"question": "q"}', r"c\.jsonl:2: row has no 'messages', 'conversations', 'prompt'/'completion' or 'text' "
                          r"field \(keys: 'question'\)"),
    ('{"messages": null}', r"c\.jsonl:2: row has no 'messages'.*\(keys: 'messages'\)"),  # null is absent
    ('{"prompt": "p"}', r"c\.jsonl:2: row has no 'completion' field"),
])
def test_bad_lines_of_a_chat_jsonl_name_the_line(tmp_path, line, expected):
    path = tmp_path / "c.jsonl"
    first = PROMPT_COMPLETION[0] if "prompt" in line else CHAT_ROW
    path.write_text(json.dumps(first) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=expected):
        open_corpus(str(path)).check()


def test_a_chat_jsonl_with_bytes_not_utf8_names_the_line_and_offset(tmp_path):
    path = tmp_path / "c.jsonl"
    first = json.dumps(CHAT_ROW).encode() + b"\n"
    path.write_bytes(first + b'{"messages": "\xc3("}\n')
    with pytest.raises(CorpusError, match=rf"c\.jsonl line 2: byte 0xc3 at byte offset {len(first) + 14} is not "
                                          "valid UTF-8"):
        list(open_corpus(str(path)).rows())


def test_null_messages_in_parquet_are_absent_as_chat_defines(tmp_path):
    """Arrow gives every row every column: a row whose 'messages' is null has the shape of its other fields."""
    rows = [CHAT_ROW, {"prompt": "p", "completion": "c"}]
    path = write_parquet_rows(tmp_path / "two.parquet", rows)
    got = [row for _, row in open_corpus(str(path)).rows()]
    assert got == [{**CHAT_ROW, "prompt": None, "completion": None},
                   {"messages": None, "prompt": "p", "completion": "c"}]
    with pytest.raises(CorpusError, match=rf"^{path}:1: this is a 'prompt-completion' row but earlier rows of the "
                                          r"file are 'messages' rows"):
        open_corpus(str(path)).check()
    path = write_parquet_rows(tmp_path / "null.parquet", [CHAT_ROW, {"messages": None}])
    with pytest.raises(CorpusError, match=rf"^{path}:1: row has no 'messages'.*\(keys: 'messages'\)"):
        open_corpus(str(path)).check()


def test_a_parquet_file_without_conversation_columns_in_a_chat_corpus_is_refused(tmp_path):
    write_parquet_rows(tmp_path / "part-0.parquet", MESSAGES)
    write_parquet(tmp_path / "part-1.parquet", ["plain text"])
    with pytest.raises(CorpusError, match=r"part-1\.parquet: no 'messages', 'conversations', 'prompt' or 'completion' "
                                          r"column \(it has columns 'text'\), but part-0\.parquet holds conversations"):
        open_corpus(str(tmp_path))


def test_an_empty_chat_corpus_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
    corpus = open_corpus(str(tmp_path / "empty.parquet"))
    assert corpus.chat
    with pytest.raises(CorpusError, match="empty corpus: .*empty.parquet yielded no conversations"):
        corpus.check()


def test_check_reads_a_large_chat_corpus_to_its_first_row_only(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "c.jsonl", [CHAT_ROW, {"text": "plain"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: this is a 'text' row"):
        open_corpus(str(path)).check()
    monkeypatch.setattr(corpus_module, "PRESCAN_BYTES", path.stat().st_size - 1)
    open_corpus(str(path)).check()  # beyond the limit: the rest is checked when the plan reads it


def test_documents_of_a_chat_corpus_and_rows_of_a_text_corpus_are_refused(tmp_path):
    chat = open_corpus(str(write_rows(tmp_path / "c.jsonl", MESSAGES)))
    with pytest.raises(CorpusError, match=r"c\.jsonl holds conversations \(rows with 'messages', 'conversations' or "
                                          r"'prompt'/'completion'\), not text documents; read it with Corpus\.rows\(\)"
                                          r", or pass --text-field"):
        chat.documents()
    text = open_corpus(str(write_jsonl(tmp_path / "t.jsonl", ["a"], field="body")), text_field="body")
    with pytest.raises(CorpusError, match=r"t\.jsonl holds text documents \(read by its text field 'body'\), not "
                                          r"conversations; read it with Corpus\.documents\(\)"):
        text.rows()
    with pytest.raises(CorpusError, match=r"^builtin:pydoc holds text documents, not conversations.*pydoc-chat"):
        open_corpus("builtin:pydoc").rows()
    with pytest.raises(CorpusError, match="builtin:pydoc-chat"):
        open_corpus("builtin:nope")
