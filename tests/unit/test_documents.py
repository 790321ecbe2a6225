"""The documents layout: plans of text and chat corpora checked against references built here (each document
tokenized alone, each conversation rendered alone), the long-sequence policies, and captures whose rows equal
each sequence's targets computed alone by the teacher (no attention across sequences), byte-identical
whatever the batching."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from click.testing import CliRunner

from helpers import CHATML, CHAT_ROWS as ROWS, cli_args, make_config, write_chat_corpus
from logitcache.capture.chat import conversation_from_row, render, trained_positions
from logitcache.capture.corpus import open_corpus
from logitcache.capture.documents import build_document_plan
from logitcache.capture.pipeline import capture_local, sequence_batches
from logitcache.capture.plan import build_plan, plan_units
from logitcache.capture.sparsify import sparsify
from logitcache.capture.teachers import load_teacher
from logitcache.cli import main
from logitcache.errors import ConfigError, CorpusError, StoreError
from logitcache.store import read_manifest
from logitcache.store.reader import iter_sequences, verify_store
from logitcache.testing.crash import job_args, run_with_fault, tree_bytes

@pytest.fixture
def chat_corpus(tmp_path):
    return write_chat_corpus(tmp_path)


def rendered(tokenizer, rows=ROWS, train_on="assistant"):
    """The reference: each conversation rendered alone, (tokens, position mask), None when it has no assistant."""
    out = []
    for n, row in enumerate(rows):
        conv = conversation_from_row(row, where=f"row {n}")
        if not conv.has_assistant:
            out.append(None)
            continue
        r = render(conv, tokenizer, chat_template=CHATML, train_on=train_on)
        out.append((r.input_ids, trained_positions(r.mask)))
    return out


def plan_of(source, tokenizer, seq_len=4096, long_sequences="truncate", **kw):
    corpus = open_corpus(str(source))
    return build_document_plan(corpus, tokenizer, seq_len=seq_len, max_tokens=kw.pop("max_tokens", None), eos_id=0,
                               long_sequences=long_sequences, train_on=kw.pop("train_on", None),
                               chat_template=kw.pop("chat_template", None))


def sequences(plan):
    return [plan.sequence(i) for i in range(plan.num_sequences)]


def test_text_documents_are_each_document_alone_plus_eos(tmp_path, tiny_tokenizer):
    docs = ["first document, short.", "", "second one\nwith two lines", "   ", "third " * 40]
    for i, text in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    plan = plan_of(tmp_path, tiny_tokenizer)
    expected = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [0] for t in docs if t.strip()]
    assert [s.tokens.tolist() for s in sequences(plan)] == expected
    assert all(s.mask.all() and s.mask.size == s.tokens.size - 1 for s in sequences(plan))
    assert plan.stats["empty_documents_skipped"] == 2 and plan.stats["documents"] == 5
    assert plan.positions == sum(len(e) - 1 for e in expected)
    packed = build_plan(open_corpus(str(tmp_path)).documents(), tiny_tokenizer, seq_len=8, max_tokens=None, eos_id=0)
    assert plan.corpus_fingerprint == packed.corpus_fingerprint  # the same documents hashed the same way
    assert plan.seq_id(0) != packed.seq_id(0)


def test_chat_sequences_equal_each_conversation_rendered_alone(chat_corpus, tiny_tokenizer):
    path, _ = chat_corpus
    plan = plan_of(path, tiny_tokenizer, chat_template=CHATML)
    expected = [r for r in rendered(tiny_tokenizer) if r is not None]
    got = sequences(plan)
    assert len(got) == len(expected) == 4
    for seq, (ids, mask) in zip(got, expected):
        assert np.array_equal(seq.tokens, ids) and np.array_equal(seq.mask, mask)
    assert plan.stats["conversations_without_assistant"] == 1
    assert plan.layout.train_on == "assistant" and plan.layout.chat_template_sha256
    last = plan_of(path, tiny_tokenizer, chat_template=CHATML, train_on="last-assistant")
    ref = [r for r in rendered(tiny_tokenizer, train_on="last-assistant") if r is not None]
    assert [s.mask.tolist() for s in sequences(last)] == [m.tolist() for _, m in ref]
    assert last.corpus_fingerprint == plan.corpus_fingerprint


@pytest.mark.parametrize("policy", ["truncate", "split", "skip"])
def test_long_sequences_follow_the_policy(chat_corpus, tiny_tokenizer, policy):
    path, _ = chat_corpus
    seq_len = 120
    plan = plan_of(path, tiny_tokenizer, seq_len=seq_len, long_sequences=policy, chat_template=CHATML)
    whole = [r for r in rendered(tiny_tokenizer) if r is not None]
    expected = []
    for ids, mask in whole:
        if ids.size <= seq_len + 1:
            expected.append((ids, mask))
        elif policy == "truncate":
            expected.append((ids[: seq_len + 1], mask[:seq_len]))
        elif policy == "split":  # chunks overlap by one token: every position once
            expected += [(ids[lo : lo + seq_len + 1], mask[lo : lo + seq_len]) for lo in range(0, ids.size - 1, seq_len)]
    kept = [(i, m) for i, m in expected if m.any()]
    got = sequences(plan)
    assert [(s.tokens.tolist(), s.mask.tolist()) for s in got] == [(i.tolist(), m.tolist()) for i, m in kept]
    assert all(s.tokens.size <= seq_len + 1 for s in got)
    long = sum(ids.size > seq_len + 1 for ids, _ in whole)
    assert long >= 1
    counted = {"truncate": plan.stats["truncated"], "split": plan.stats["split"], "skip": plan.stats["skipped_long"]}
    assert counted[policy] == long
    assert plan.stats["skipped_untrained"] == len(expected) - len(kept)
    if policy == "split":
        positions = sum(int(m.sum()) for _, m in whole)
        assert plan.positions == positions  # nothing lost, nothing twice


def test_max_tokens_keeps_whole_sequences_and_reads_everything(chat_corpus, tiny_tokenizer):
    path, _ = chat_corpus
    full = plan_of(path, tiny_tokenizer, chat_template=CHATML)
    first = full.sequence(0).tokens.size
    part = plan_of(path, tiny_tokenizer, chat_template=CHATML, max_tokens=first + 1)
    assert part.num_sequences == 2 and part.corpus_fingerprint == full.corpus_fingerprint
    assert [s.tokens.tolist() for s in sequences(part)] == [s.tokens.tolist() for s in sequences(full)[:2]]
    assert part.seq_id(1) == full.seq_id(1)


def test_a_unit_slice_reads_like_the_plan(chat_corpus, tiny_tokenizer):
    path, _ = chat_corpus
    plan = plan_of(path, tiny_tokenizer, seq_len=120, long_sequences="split", chat_template=CHATML)
    for unit in plan_units(plan, 3):
        part = plan.slice(unit)
        for i in range(unit.start, unit.stop):
            a, b = plan.sequence(i), part.sequence(i)
            assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.mask, b.mask)
            assert part.seq_id(i) == plan.seq_id(i)
        with pytest.raises(IndexError):
            part.sequence(unit.stop)


def test_bad_chat_input_is_refused_naming_the_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"text": "plain"}) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c\.jsonl:2"):
        plan_of(path, tiny_tokenizer, chat_template=CHATML)
    only_users = tmp_path / "u.jsonl"
    only_users.write_text(json.dumps(ROWS[2]) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no sequence .* has a position to train"):
        plan_of(only_users, tiny_tokenizer, chat_template=CHATML)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="--chat-template"):
        plan_of(ok, tiny_tokenizer)  # the tiny tokenizer has no template of its own
    text = tmp_path / "t.txt"
    text.write_text("some text", encoding="utf-8")
    with pytest.raises(CorpusError, match="needs a chat corpus"):
        plan_of(text, tiny_tokenizer, train_on="assistant")


def test_sequence_batches_cover_each_sequence_once_within_the_budget():
    lengths = [5, 300, 64, 65, 1, 128, 700, 3]
    batches = sequence_batches(lengths, 256, 1024)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    order = [i for b in batches for i in b]
    assert [lengths[i] for i in order] == sorted(lengths)
    for b in batches:  # padded to multiples of 64; a sequence over the budget goes alone
        padded = [-(-lengths[i] // 64) * 64 for i in b]
        assert sum(padded) <= 256 or len(b) == 1


def capture_chat(tiny_teacher, path, template, out, **over):
    config = make_config(tiny_teacher, out, method=over.pop("method", "topk"), **{
        "corpus.source": str(path), "corpus.max_tokens": None, "corpus.seq_len": 120,
        "corpus.long_sequences": "split", "corpus.chat_template": str(template), "store.sequences_per_shard": 2,
        **over})
    return config, capture_local(config, progress=False)


def test_a_chat_capture_holds_each_sequence_alone_at_its_trained_positions(chat_corpus, tiny_teacher, tmp_path):
    path, template = chat_corpus
    config, summary = capture_chat(tiny_teacher, path, template, tmp_path / "store")
    header = read_manifest(summary.store).header
    assert header.layout == "documents" and header.corpus["layout"]["train_on"] == "assistant"
    assert verify_store(summary.store).ok
    teacher = load_teacher(config.teacher)
    rows = list(iter_sequences(summary.store, with_mask=True))
    assert header.plan.positions == sum(int(m.sum()) for _, _, m, _ in rows) == summary.tokens
    for seq_id, tokens, mask, targets in rows:  # reference: the sequence alone, a batch of one, no padding
        alone = torch.from_numpy(tokens[:-1].astype(np.int64))[None]
        logits = torch.cat([c for _, _, c in teacher.forward_chunks(alone, config.teacher.head_chunk)])
        expected = sparsify(logits[torch.from_numpy(mask)], config.sparsify, None)
        assert targets.num_positions == int(mask.sum())
        assert torch.equal(targets.head_ids, expected.head_ids.to(targets.head_ids.dtype))
        assert torch.allclose(targets.head_logprobs, expected.head_logprobs.float(), atol=1e-5)
        assert torch.allclose(targets.tail_mass, expected.tail_mass.float(), atol=1e-5)


def test_batching_never_changes_a_byte(chat_corpus, tiny_teacher, tmp_path):
    path, template = chat_corpus
    stores = []
    for n, batch_tokens in enumerate((64, 100_000)):
        out = tmp_path / f"s{n}"
        capture_chat(tiny_teacher, path, template, out, method="sample", batch_tokens=batch_tokens)
        stores.append(tree_bytes(out))
    assert stores[0] == stores[1]


def test_a_packed_layout_refuses_a_chat_corpus(chat_corpus, tiny_teacher, tmp_path):
    path, template = chat_corpus
    with pytest.raises(ConfigError, match="--layout documents"):
        capture_chat(tiny_teacher, path, template, tmp_path / "s", **{"corpus.layout": "packed",
                                                                       "corpus.chat_template": None})


@pytest.mark.parametrize("fault", ["teacher_chunk:3", "mid_write:4", "after_commit:1"])
def test_sigkill_mid_chat_capture_then_resume_is_byte_identical(chat_corpus, tiny_teacher, tmp_path, fault):
    path, template = chat_corpus
    config, _ = capture_chat(tiny_teacher, path, template, tmp_path / "ref", method="hybrid")
    out = tmp_path / "s"
    killed = run_with_fault(job_args(config.with_overrides({"store.path": str(out)}), tmp_path / "j.yaml"), fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    capture_local(config.with_overrides({"store.path": str(out)}), progress=False)
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


@pytest.mark.parametrize("change", ["template", "train_on", "long_sequences"])
def test_a_changed_template_or_policy_is_refused_on_resume(chat_corpus, tiny_teacher, tmp_path, change):
    path, template = chat_corpus
    out = tmp_path / "s"
    capture_chat(tiny_teacher, path, template, out)
    before = tree_bytes(out)
    other = tmp_path / "other.jinja"
    other.write_text(CHATML + "{# the same rendering, another template text #}", encoding="utf-8")
    over = {"template": {"corpus.chat_template": str(other)}, "train_on": {"corpus.train_on": "last-assistant"},
            "long_sequences": {"corpus.long_sequences": "truncate"}}[change]
    field = {"template": "chat_template_sha256", "train_on": "train_on", "long_sequences": "long_sequences"}[change]
    with pytest.raises(StoreError, match=rf"corpus\.layout\.{field}"):
        capture_chat(tiny_teacher, path, template, out, **over)
    assert tree_bytes(out) == before


def test_the_cli_captures_a_chat_corpus_and_inspect_reports_the_plan(chat_corpus, tiny_teacher, tmp_path):
    path, template = chat_corpus
    out = tmp_path / "s"
    args = cli_args(make_config(tiny_teacher, out, method="topk", **{"corpus.max_tokens": 10_000}))
    args += ["--corpus", str(path), "--chat-template", str(template), "--seq-len", "120", "--layout", "documents",
             "--long-sequences", "skip", "--train-on", "last-assistant"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    header = read_manifest(out).header
    assert header.corpus["layout"] == {"name": "documents", "long_sequences": "skip", "train_on": "last-assistant",
                                       "chat_template_sha256": header.corpus["layout"]["chat_template_sha256"]}
    shown = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert "layout         documents; long sequences skip" in shown
    assert "skipped long 2" in shown and "conversations without assistant 1" in shown
    assert f"{header.plan.sequences} documents of at most 120 positions" in shown


def test_a_template_that_refuses_a_role_fails_before_any_store_exists(tmp_path, tiny_teacher):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "critic", "content": "meh"}, {"role": "assistant", "content": "ok"}]}]
    path, _ = write_chat_corpus(tmp_path, rows)
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                      "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
                      "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}", encoding="utf-8")
    out = tmp_path / "s"
    with pytest.raises(CorpusError, match=r"chat\.jsonl:2.*role 'critic'"):
        capture_chat(tiny_teacher, path, strict, out)
    assert not out.exists() or not any(out.iterdir())
