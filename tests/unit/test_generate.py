"""Teacher-generated responses: the plan's prompts against references rendered by hand from the ChatML
template, greedy responses against ``transformers``' own ``generate``, the sampler against a reference
distribution, stored sequences (mask exactly on the response, targets equal to the sequence's computed
alone, finish reasons), the export, and crash/resume and batching byte identity (tiny teacher)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from helpers import make_config, write_chat_corpus
from logitcache.capture.config import CaptureConfig, GenerateConfig
from logitcache.capture.corpus import open_corpus
from logitcache.capture.export import export_generations, iter_generated
from logitcache.capture.generate import build_generation_plan, generation_seed, response_sequence
from logitcache.capture.pipeline import capture_local
from logitcache.capture.sparsify import sparsify
from logitcache.capture.teachers import load_teacher
from logitcache.capture.teachers.sampling import sample_token
from logitcache.errors import ConfigError, CorpusError, StoreError, TeacherError
from logitcache.store import inspect_store, read_manifest
from logitcache.store.convert import convert
from logitcache.store.reader import iter_sequences, verify_store
from logitcache.testing.crash import job_args, run_with_fault, tree_bytes

LONG = "Tell me everything about tuples, lists and sets. " * 6
ROWS = [
    {"messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a loop."},
                  {"role": "assistant", "content": "for"}, {"role": "user", "content": "Another?"},
                  {"role": "assistant", "content": "while"}]},
    {"messages": [{"role": "system", "content": "Only a system turn."}]},
    {"messages": [{"role": "user", "content": "  "}]},
    {"messages": [{"role": "user", "content": LONG}]},
    {"messages": [{"role": "user", "content": "hi"}]},
]
# the prompts by hand (ChatML, generation prompt on): what rows 0, 1 and 5 must render to
EXPECTED = [
    "<|im_start|>user\nWhat is a list?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a loop.<|im_end|>\n<|im_start|>assistant\nfor"
    "<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]
SEQ_LEN, NEW = 180, 10


@pytest.fixture
def corpus(tmp_path):
    return write_chat_corpus(tmp_path, ROWS)


def generate_config(tiny_teacher, corpus, out, method="topk", **over) -> CaptureConfig:
    path, template = corpus
    return make_config(tiny_teacher, out, method=method, **{
        "corpus.source": str(path), "corpus.max_tokens": None, "corpus.seq_len": SEQ_LEN,
        "corpus.chat_template": str(template), "store.sequences_per_shard": 2,
        "generate.max_new_tokens": NEW, "generate.n": 2, **over})


def test_the_plan_holds_each_prompt_up_to_its_last_user_turn_n_times(corpus, tiny_tokenizer):
    path, template = corpus
    settings = GenerateConfig(max_new_tokens=NEW, n=2)
    plan = build_generation_plan(open_corpus(str(path)), tiny_tokenizer, seq_len=SEQ_LEN, max_tokens=None,
                                 settings=settings, chat_template=template.read_text(), stop_ids=(0,))
    expected = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in EXPECTED]
    assert len(tiny_tokenizer(EXPECTED[0].replace("What is a list?", LONG))["input_ids"]) > SEQ_LEN + 1 - NEW
    assert plan.num_sequences == 6 and plan.positions == 6 * NEW
    for i in range(plan.num_sequences):
        assert plan.prompt(i).tolist() == expected[i // 2]
    assert plan.stats == {"documents": 6, "prompts": 3, "sequences": 6, "prompt_tokens": sum(map(len, expected)),
                          "prompts_without_user": 1, "empty_prompts": 1, "skipped_long_prompts": 1}
    ids = [plan.seq_id(i) for i in range(6)]
    assert len(set(ids)) == 6
    part = plan.slice(plan_unit(3, 6))
    assert [part.prompt(i).tolist() for i in range(3, 6)] == [expected[1], expected[2], expected[2]]
    assert [part.seq_id(i) for i in range(3, 6)] == ids[3:]


def plan_unit(start, stop):
    from logitcache.capture.plan import Unit

    return Unit(0, start, stop)


def test_greedy_responses_equal_transformers_generate(corpus, tiny_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    config = generate_config(tiny_teacher, corpus, tmp_path / "s", **{"generate.temperature": 0.0})
    capture_local(config, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    rows = list(iter_generated(config.store.path))
    assert len(rows) == 6
    for row in rows:
        prompt = torch.from_numpy(row.tokens[:row.prompt_length].astype(np.int64))[None]
        out = model.generate(prompt, do_sample=False, max_new_tokens=NEW, eos_token_id=0, pad_token_id=1,
                             attention_mask=torch.ones_like(prompt))
        assert row.response.tolist() == out[0, prompt.shape[1]:].tolist()
        assert row.finish == ("stop" if row.response[-1] == 0 else "length")


def test_a_generated_row_is_prompt_plus_response_with_targets_at_the_response_only(corpus, tiny_teacher, tmp_path):
    config = generate_config(tiny_teacher, corpus, tmp_path / "s", **{"generate.stop": ["e"]})
    summary = capture_local(config, progress=False)
    assert verify_store(summary.store).ok
    teacher = load_teacher(config.teacher)
    generated = list(iter_generated(summary.store))
    rows = list(iter_sequences(summary.store, with_mask=True))
    assert summary.tokens == sum(int(m.sum()) for _, _, m, _ in rows) == sum(g.response.size for g in generated)
    for (seq_id, tokens, mask, targets), g in zip(rows, generated, strict=True):
        prompt_length = len(tokens) - g.response.size
        assert g.seq_id == seq_id and prompt_length == g.prompt_length
        assert mask.tolist() == [t >= prompt_length - 1 for t in range(len(tokens) - 1)]  # exactly the response
        text = teacher.tokenizer.decode(g.response.tolist())
        if g.finish == "stop-string":
            assert "e" in text and "e" not in teacher.tokenizer.decode(g.response[:-1].tolist())
        elif g.finish == "stop":
            assert g.response[-1] == teacher.eos_id and teacher.eos_id not in g.response[:-1]
        else:
            assert g.finish == "length" and g.response.size == NEW and "e" not in text
        alone = torch.from_numpy(tokens[:-1].astype(np.int64))[None]  # reference: the sequence read alone
        logits = torch.cat([c for _, _, c in teacher.forward_chunks(alone, config.teacher.head_chunk)])
        expected = sparsify(logits[torch.from_numpy(mask)], config.sparsify, None)
        assert torch.equal(targets.head_ids, expected.head_ids.to(targets.head_ids.dtype))
        assert torch.allclose(targets.head_logprobs, expected.head_logprobs.float(), atol=1e-5)
    reasons = [g.finish for g in generated]
    stats = inspect_store(summary.store)["generation"]
    assert stats["responses"] == 6 and stats["finish_reasons"]["stop-string"] == reasons.count("stop-string") > 0
    assert stats["stop_string_hits"] == {"e": reasons.count("stop-string")}
    assert stats["max_response_tokens"] == max(g.response.size for g in generated)


def test_the_export_decodes_the_stored_responses_into_conversations(corpus, tiny_teacher, tmp_path):
    config = generate_config(tiny_teacher, corpus, tmp_path / "s", **{"generate.stop": ["e", "never-there"]})
    capture_local(config, progress=False)
    out = tmp_path / "sft.jsonl"
    summary = export_generations(config.store.path, out, chat_template=config.corpus.chat_template)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    tokenizer = load_teacher(config.teacher).tokenizer
    prompts = [ROWS[0]["messages"][:1], ROWS[1]["messages"][:4], ROWS[5]["messages"]]
    assert summary.responses == len(lines) == 6
    for i, (line, row) in enumerate(zip(lines, iter_generated(config.store.path), strict=True)):
        assert line["messages"][:-1] == prompts[i // 2]
        text = row.response[:-1] if row.finish == "stop" else row.response  # the template adds the end of turn
        assert line["messages"][-1] == {"role": "assistant", "content": tokenizer.decode(text.tolist())}
        assert (line["finish_reason"], line["completion_tokens"], line["prompt_tokens"]) == \
            (row.finish, row.response.size, row.prompt_length)
        assert line.get("stop_string") == ("e" if row.finish == "stop-string" else None)
    assert inspect_store(config.store.path)["generation"]["stop_string_hits"]["never-there"] == 0
    (tmp_path / "other").mkdir()
    other, _ = write_chat_corpus(tmp_path / "other", ROWS[:2])
    with pytest.raises(CorpusError, match="fingerprint"):
        export_generations(config.store.path, tmp_path / "x.jsonl", corpus=str(other),
                           chat_template=config.corpus.chat_template)


def test_a_stop_token_ends_a_response_and_stays_in_it(tiny_teacher):
    teacher = load_teacher(make_config(tiny_teacher, "unused").teacher)
    prompt = torch.arange(2, 12)
    settings = GenerateConfig(max_new_tokens=5, temperature=0.7, top_k=20)
    free = teacher.generate([prompt], settings, [7], stop_ids=[])[0]
    assert free.finish == "length" and free.tokens.size == 5
    stopped = teacher.generate([prompt], settings, [7], stop_ids=[int(free.tokens[2])])[0]
    first = free.tokens.tolist().index(free.tokens[2])
    assert stopped.finish == "stop" and stopped.tokens.tolist() == free.tokens[:first + 1].tolist()


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """What one draw of :func:`sample_token` must follow, computed token by token."""
    scores = logits / temperature
    if top_k:
        scores = np.where(scores >= np.sort(scores)[::-1][top_k - 1], scores, -np.inf)
    p = np.exp(scores - scores.max())
    p /= p.sum()
    keep, mass = np.zeros_like(p, dtype=bool), 0.0
    for i in sorted(range(p.size), key=lambda i: (-p[i], i)):
        if mass < top_p:
            keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.5, 0, 0.6), (1.0, 4, 0.8)])
def test_the_sampler_follows_temperature_top_k_and_top_p(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.4, 0.0, -1.0, -3.0, 1.5])
    settings = GenerateConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    expected = reference_distribution(logits.double().numpy(), temperature, top_k, top_p)
    gen = torch.Generator().manual_seed(0)
    draws = 20_000
    counts = np.bincount([sample_token(logits, settings, gen) for _ in range(draws)], minlength=logits.numel())
    assert np.all(counts[expected == 0] == 0)
    assert np.abs(counts / draws - expected).max() < 4 * np.sqrt(0.25 / draws)
    assert sample_token(logits, GenerateConfig(max_new_tokens=1, temperature=0.0), gen) == 0


def test_seeds_depend_on_the_sequence_only():
    assert generation_seed(0, 5) == generation_seed(0, 5) != generation_seed(1, 5) != generation_seed(0, 6)
    with pytest.raises(TeacherError, match="max_new_tokens"):
        response_sequence(np.arange(3), np.arange(4), 3)


def test_batching_and_encode_threads_never_change_a_byte(corpus, tiny_teacher, tmp_path):
    stores = []
    for n, over in enumerate(({"batch_tokens": 64}, {"batch_tokens": 100_000, "encode_threads": 3})):
        config = generate_config(tiny_teacher, corpus, tmp_path / f"s{n}", method="hybrid", **over)
        capture_local(config, progress=False)
        stores.append(tree_bytes(config.store.path))
    assert stores[0] == stores[1]


def test_a_response_depends_on_its_sequence_alone_not_on_its_unit(corpus, tiny_teacher, tmp_path):
    rows = []
    for per_shard in (1, 4):
        config = generate_config(tiny_teacher, corpus, tmp_path / f"s{per_shard}", method="sample",
                                 **{"store.sequences_per_shard": per_shard, "generate.top_p": 0.9})
        capture_local(config, progress=False)
        rows.append([(r.seq_id, r.tokens.tolist(), r.finish) for r in iter_generated(config.store.path)])
    assert rows[0] == rows[1]
    assert rows[0][0][1] != rows[0][1][1]  # two responses to one prompt differ (their own seeds)
    teacher = load_teacher(config.teacher)  # and a response never depends on what the teacher generated before
    p, q = torch.arange(2, 12), torch.arange(40, 45)
    settings = GenerateConfig(max_new_tokens=8, temperature=1.0)
    alone = teacher.generate([p], settings, [11], [])[0]
    after = teacher.generate([q, p], settings, [12, 11], [])[1]
    assert alone.tokens.tolist() == after.tokens.tolist()


# (fault, units surely committed when it fires): this capture's trace puts generate:20 in the second unit and
# generate:45, teacher_chunk:70 in the third, which starts once the first unit's commit is done
@pytest.mark.parametrize("fault,committed", [("generate:20", 0), ("generate:45", 1), ("teacher_chunk:70", 1),
                                             ("after_commit:1", 1)])
def test_sigkill_mid_generation_then_resume_is_byte_identical(corpus, tiny_teacher, tmp_path, fault, committed):
    config = generate_config(tiny_teacher, corpus, tmp_path / "ref", method="hybrid")
    capture_local(config, progress=False)
    out = config.with_overrides({"store.path": str(tmp_path / "s")})
    killed = run_with_fault(job_args(out, tmp_path / "j.yaml"), fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list((tmp_path / "s" / "commits").glob("*.json"))) >= committed
    capture_local(out, progress=False)
    assert tree_bytes(out.store.path) == tree_bytes(config.store.path)


def test_a_resume_with_other_generation_settings_is_refused_naming_the_field(corpus, tiny_teacher, tmp_path):
    config = generate_config(tiny_teacher, corpus, tmp_path / "s")
    capture_local(config, progress=False)
    with pytest.raises(StoreError, match="generate.temperature"):
        capture_local(config.with_overrides({"generate.temperature": 0.5}), progress=False)


def test_stores_without_generation_keep_their_identity(tiny_teacher, tmp_path):
    assert "generate" not in CaptureConfig().identity()
    header = read_manifest(capture_local(make_config(tiny_teacher, tmp_path / "p"), progress=False).store).header
    assert "generate" not in header.identity


def test_a_generated_store_converts_with_its_finish_reasons(corpus, tiny_teacher, tmp_path):
    config = generate_config(tiny_teacher, corpus, tmp_path / "s", method="sample", **{"generate.stop": ["e"]})
    capture_local(config, progress=False)
    convert(config.store.path, str(tmp_path / "z"), format="zarr", entropy="ans")
    assert verify_store(tmp_path / "z").ok
    same = [(r.seq_id, r.tokens.tolist(), r.finish, r.stop_string) for r in iter_generated(config.store.path)]
    assert same == [(r.seq_id, r.tokens.tolist(), r.finish, r.stop_string) for r in iter_generated(tmp_path / "z")]


@pytest.mark.parametrize("over,match", [
    ({"generate.n": 0}, "generate.n"),
    ({"generate.max_new_tokens": SEQ_LEN}, "leaves no room"),
    ({"generate.max_new_tokens": 0, "generate.top_k": 5}, "generation off"),
    ({"corpus.layout": "packed"}, "documents layout"),
    ({"corpus.train_on": "assistant"}, "train_on"),
    ({"generate.stop": [""]}, "non-empty strings"),
])
def test_bad_settings_are_refused(corpus, tiny_teacher, tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        generate_config(tiny_teacher, corpus, tmp_path / "s", **over)


def test_a_text_corpus_or_one_without_prompts_is_refused(tiny_teacher, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text", encoding="utf-8")
    with pytest.raises(CorpusError, match="not conversations"):
        capture_local(generate_config(tiny_teacher, (text, None), tmp_path / "a", **{"corpus.chat_template": None}),
                      progress=False)
    none = write_chat_corpus(tmp_path, ROWS[2:5])
    with pytest.raises(CorpusError, match="prompts_without_user 1, empty_prompts 1, skipped_long_prompts 1"):
        capture_local(generate_config(tiny_teacher, none, tmp_path / "b"), progress=False)


def test_a_finish_code_naming_an_unlisted_stop_string_is_refused():
    from logitcache.errors import CorruptShardError
    from logitcache.store.finish import finish_code, row_finish

    two_stops = {"finish_reason": np.frombuffer(bytes([finish_code("stop-string", 1)]), np.uint8)}
    assert row_finish(two_stops, 2) == ("stop-string", 1)
    with pytest.raises(CorruptShardError, match="names stop string 1; the store's settings list 1"):
        row_finish(two_stops, 1)
