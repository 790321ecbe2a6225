"""Chat rows and their rendering: row shapes and every bad-row message, and the token mask checked against an
independent reference on real tokenizers and three templates.

The reference never uses the implementation's method (prefix renders, character offsets): it finds each
assistant span by plain string search for the template's own header and end-of-turn marker, and maps it to
tokens through the **bytes** of each token (the byte-level BPE alphabet decoded by hand), checking first that
the tokens' bytes concatenate to the rendered text.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from logitcache.capture.chat import (
    SHAREGPT_ROLES, Conversation, Message, conversation_from_row, pydoc_chat_rows, read_chat_template, render,
    resolve_chat_template, row_shape, template_sha256, trained_positions,
)
from logitcache.errors import ConfigError, CorpusError
from logitcache.models.embedded import is_complete
from logitcache.models.home import logitcache_home

LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
          "{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
# (header before an assistant's trained text, end-of-turn marker) per template, for the reference
MARKERS = {"chatml": ("<|im_start|>assistant\n", "<|im_end|>"),
           "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
           "zephyr": ("<|assistant|>", None)}  # Zephyr's "\n" after <|assistant|> is generated, so it trains

CONVERSATIONS = {
    "multi-turn": [("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?"), ("assistant", "6, of course.")],
    "system": [("system", "Answer briefly."), ("user", "Name a colour."), ("assistant", "Blue")],
    "empty-system": [("system", ""), ("user", "hi"), ("assistant", "hello there")],
    "tool": [("user", "Weather?"), ("assistant", "Calling the tool."), ("tool", '{"temp": 21}'),
             ("assistant", "It is 21 degrees.")],
    "empty-assistant": [("user", "Say nothing."), ("assistant", "")],
    "unicode": [("user", "Grüße 😀🎉 — 日本語?"), ("assistant", "Émojis: 👩‍💻 ✓ «ok»")],
    "whitespace": [("user", "indent"), ("assistant", "\n\n  indented block\n  \n"), ("user", "x"),
                   ("assistant", "  done.  ")],
}


def conversation(name: str) -> Conversation:
    return Conversation(tuple(Message(r, c) for r, c in CONVERSATIONS[name]), origin=f"chat.jsonl:{name}")


@pytest.fixture(scope="module")
def smol():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template), from the converted embedded teacher."""
    from transformers import AutoTokenizer

    path = logitcache_home() / "teachers" / "smollm2-135m-instruct"
    if not is_complete(path):
        pytest.skip(f"embedded teacher not converted at {path}; `logitcache capture` once converts it")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """The test's own templates, written as files and read back the way --chat-template reads them."""
    root = tmp_path_factory.mktemp("templates")
    for name, text in (("llama3", LLAMA3), ("zephyr", ZEPHYR)):
        (root / f"{name}.jinja").write_text(text, encoding="utf-8")
    return {name: read_chat_template(root / f"{name}.jinja") for name in ("llama3", "zephyr")}


def byte_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, inverted: each printable stand-in character -> its byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def token_bytes(tokenizer, ids) -> list[bytes]:
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    decode = byte_decoder()
    return [piece.encode() if i in special else bytes(decode[c] for c in piece)
            for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids))]


def reference_mask(tokenizer, text: str, ids, kind: str, eos: str, last_only: bool = False) -> np.ndarray:
    """Token j trains iff its bytes overlap the bytes of an assistant span found by string search; j > 0."""
    header, end_marker = MARKERS[kind]
    end_marker = end_marker or eos
    spans, at = [], text.find(header)
    while at >= 0:
        start = at + len(header)
        end = text.index(end_marker, start) + len(end_marker)
        spans.append((len(text[:start].encode()), len(text[:end].encode())))
        at = text.find(header, end)
    spans = spans[-1:] if last_only else spans
    pieces = token_bytes(tokenizer, ids)
    assert b"".join(pieces) == text.encode()  # the reference's own premise
    bounds = np.cumsum([0, *map(len, pieces)])
    mask = np.array([any(lo < e and hi > s for s, e in spans) for lo, hi in zip(bounds[:-1], bounds[1:])])
    mask[:1] = False
    return mask


def cases():
    for kind in ("chatml", "llama3", "zephyr"):
        for name in CONVERSATIONS:
            if not (kind == "zephyr" and name == "tool"):  # Zephyr refuses the tool role (tested below)
                yield pytest.param(kind, name, id=f"{kind}-{name}")


@pytest.mark.parametrize("kind, name", list(cases()))
@pytest.mark.parametrize("train_on", ["assistant", "last-assistant"])
def test_mask_equals_the_byte_reference(smol, templates, kind, name, train_on):
    chat = conversation(name)
    template = None if kind == "chatml" else templates[kind]
    rendered = render(chat, smol, chat_template=template, train_on=train_on)
    text = smol.apply_chat_template(chat.as_dicts(), chat_template=template, tokenize=False)
    ids = smol.apply_chat_template(chat.as_dicts(), chat_template=template, tokenize=True, return_dict=False)
    assert rendered.input_ids.dtype == np.int32 and rendered.input_ids.tolist() == ids
    expected = reference_mask(smol, text, ids, kind, smol.eos_token, last_only=train_on == "last-assistant")
    assert rendered.mask.tolist() == expected.tolist()
    assert rendered.trained == expected.sum() > 0
    assert rendered.labels().tolist() == np.where(expected, ids, -100).tolist()
    assert trained_positions(rendered.mask).tolist() == expected[1:].tolist()
    assert rendered.template_sha256 == template_sha256(resolve_chat_template(smol, template))


def test_chatml_trains_content_and_im_end_not_the_newline_or_header(smol):
    rendered = render(conversation("system"), smol)
    pieces = smol.convert_ids_to_tokens(rendered.input_ids.tolist())
    trained = [p for p, m in zip(pieces, rendered.mask) if m]
    assert trained == ["Blue", "<|im_end|>"]
    last_end = max(j for j, p in enumerate(pieces) if p == "<|im_end|>")
    assert rendered.mask[last_end] and not rendered.mask[last_end + 1]  # the "\n" after <|im_end|> does not train


def test_tiny_tokenizer_with_a_template_file(tiny_tokenizer, templates):
    """The tiny teacher's tokenizer has no template of its own; the Zephyr template file renders for it."""
    chat = conversation("multi-turn")
    rendered = render(chat, tiny_tokenizer, chat_template=templates["zephyr"])
    text = tiny_tokenizer.apply_chat_template(chat.as_dicts(), chat_template=templates["zephyr"], tokenize=False)
    ids = tiny_tokenizer.apply_chat_template(chat.as_dicts(), chat_template=templates["zephyr"], return_dict=False)
    assert rendered.input_ids.tolist() == ids
    assert rendered.mask.tolist() == reference_mask(tiny_tokenizer, text, ids, "zephyr", "<|endoftext|>").tolist()


def test_train_on_all_trains_every_token_but_the_first(smol):
    rendered = render(conversation("multi-turn"), smol, train_on="all")
    assert not rendered.mask[0] and rendered.mask[1:].all() and rendered.trained == len(rendered.input_ids) - 1


def test_unknown_train_on_is_refused(smol):
    with pytest.raises(ConfigError, match="train_on must be one of assistant, last-assistant, all; found 'user'"):
        render(conversation("system"), smol, train_on="user")


def test_no_assistant_turn_gives_an_empty_mask_not_an_error(smol):
    chat = conversation_from_row({"messages": [{"role": "user", "content": "hi"}]}, where="c.jsonl:4")
    assert not chat.has_assistant
    assert render(chat, smol).trained == 0
    assert not conversation_from_row({"messages": []}, where="c.jsonl:5").has_assistant


def test_prompt_completion_strings_train_the_completion_only(smol):
    chat = conversation_from_row({"prompt": "Capital of France?", "completion": "Paris."}, where="pc.jsonl:1")
    assert chat.messages == (Message("user", "Capital of France?"), Message("assistant", "Paris."))
    trained = [p for p, m in zip(smol.convert_ids_to_tokens(render(chat, smol).input_ids.tolist()),
                                 render(chat, smol).mask) if m]
    assert trained == ["Paris", ".", "<|im_end|>"]


def test_prompt_completion_lists_never_train_assistant_turns_of_the_prompt(smol):
    row = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "early answer"},
                      {"role": "user", "content": "b"}],
           "completion": [{"role": "assistant", "content": "final answer"}]}
    chat = conversation_from_row(row, where="pc.jsonl:2")
    assert chat.completion_start == 3 and chat.trained_turns("assistant") == [3]
    rendered = render(chat, smol)
    full = render(Conversation(chat.messages, chat.origin), smol)  # same turns as plain messages: both train
    assert rendered.input_ids.tolist() == full.input_ids.tolist()
    assert rendered.mask.tolist() == render(chat, smol, train_on="last-assistant").mask.tolist()
    assert 0 < rendered.trained < full.trained


def test_sharegpt_rows_map_speakers_to_roles():
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}, {"from": "observation", "value": "o"}]}
    chat = conversation_from_row(row, where="sg.jsonl:1")
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool"]
    assert row_shape(row, where="sg.jsonl:1") == "sharegpt" and SHAREGPT_ROLES["gpt"] == "assistant"


def test_parquet_rows_with_null_keys_are_read_and_non_null_extra_keys_refused(tmp_path):
    """Arrow gives every message every key of the column's struct; null ones are absent, others refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q", "name": "ann"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    first, second = pq.read_table(tmp_path / "chat.parquet").to_pylist()
    assert first["messages"][0] == {"role": "user", "content": "q", "name": None}
    assert conversation_from_row(first, where="chat.parquet:0").messages[1] == Message("assistant", "a")
    with pytest.raises(CorpusError, match=r"chat.parquet:1 'messages' message 0: has keys 'name' that logitcache "
                                          r"does not render; expected only 'role' and 'content'"):
        conversation_from_row(second, where="chat.parquet:1")


BAD_ROWS = {
    "not-object": (["a"], r"found a list, expected an object with a 'messages'"),
    "no-field": ({"question": "q"}, r"no 'messages', 'conversations', 'prompt'/'completion' or 'text' field "
                                    r"\(keys: 'question'\)"),
    "text-and-messages": ({"text": "t", "messages": []}, r"row has both 'text' and 'messages'"),
    "text-row": ({"text": "t"}, r"a 'text' row is not a conversation"),
    "no-completion": ({"prompt": "p"}, r"row has no 'completion' field; a prompt/completion row needs both"),
    "no-prompt": ({"completion": "c"}, r"row has no 'prompt' field"),
    "mixed-pc": ({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]},
                 r"'prompt' is a str but 'completion' is a list; expected both strings or both lists"),
    "messages-not-list": ({"messages": "hi"}, r"'messages': found a str, expected a list of messages"),
    "missing-content": ({"messages": [{"role": "user"}]}, r"'messages' message 0: has no 'content' \(keys: 'role'\)"),
    "content-int": ({"messages": [{"role": "user", "content": 3}]}, r"message 0: 'content' is a int \(3\), expected"),
    "empty-role": ({"messages": [{"role": "", "content": "x"}]}, r"message 0: 'role' is empty, expected a role name"),
    "tool-calls": ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{}]}]}, r"has keys 'tool_calls'"),
    "sharegpt-speaker": ({"conversations": [{"from": "bot", "value": "x"}]},
                         r"'conversations' message 0: unknown ShareGPT speaker 'bot'; expected one of system, human"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_rows_name_file_row_and_what_was_expected(name):
    row, message = BAD_ROWS[name]
    with pytest.raises(CorpusError, match=r"^bad\.jsonl:7.*" + message):
        conversation_from_row(row, where="bad.jsonl:7")


def test_mixed_text_and_messages_lines_in_one_file_name_the_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n" + json.dumps({"text": "t"}))
    lines = path.read_text().splitlines()
    shape = row_shape(json.loads(lines[0]), where=f"{path}:1")
    with pytest.raises(CorpusError, match=rf"{path}:2: this is a 'text' row but earlier rows of the file are "
                                          r"'messages' rows"):
        conversation_from_row(json.loads(lines[1]), where=f"{path}:2", shape=shape)


def test_no_chat_template_says_to_pass_one(tiny_tokenizer):
    with pytest.raises(ConfigError, match=r"has no chat template.*pass one with --chat-template FILE"):
        render(conversation("system"), tiny_tokenizer)


def test_a_role_the_template_rejects_names_row_and_role(smol, templates):
    with pytest.raises(CorpusError, match=r"chat.jsonl:tool: the chat template refused message 2 \(role 'tool'\): "
                                          r"Unknown role: tool"):
        render(conversation("tool"), smol, chat_template=templates["zephyr"])


def test_a_template_that_drops_a_role_is_refused(smol):
    silent = "{% for m in messages %}{% if m['role'] != 'tool' %}{{ m['role'] + ': ' + m['content'] + eos_token }}" \
             "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    with pytest.raises(CorpusError, match=r"dropped or rewrote message 2 \(role 'tool'\)"):
        render(conversation("tool"), smol, chat_template=silent)


def test_a_template_that_is_not_prefix_stable_is_refused_unless_last_assistant(smol):
    """Like Qwen3's template, this one drops the reasoning of assistant turns that are not the last message."""
    drops_thinking = ("{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and not "
                      "loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}{{ m['role'] + ': ' + c + "
                      "eos_token }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    chat = conversation_from_row({"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>easy</think>4."},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>also easy</think>6."}]},
        where="think.jsonl:1")
    with pytest.raises(CorpusError, match=r"think.jsonl:1 message 1: .*not prefix-stable.*'last-assistant'"):
        render(chat, smol, chat_template=drops_thinking)
    rendered = render(chat, smol, chat_template=drops_thinking, train_on="last-assistant")
    # the token " <" straddles the prompt's space and the content, so it trains (and decodes with its space)
    assert smol.decode(rendered.input_ids[rendered.mask]) == " <think>also easy</think>6.<|im_end|>"


def test_a_conversation_opening_with_the_assistant_is_refused(smol):
    chat = conversation_from_row({"messages": [{"role": "assistant", "content": "hi"}]}, where="c.jsonl:9")
    with pytest.raises(CorpusError, match=r"c.jsonl:9 message 0: the conversation opens with an assistant turn"):
        render(chat, smol)


def test_read_chat_template_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; expected a Jinja template file"):
        read_chat_template(tmp_path / "none.jinja")
    (tmp_path / "bad.jinja").write_bytes(b"{{ x }}\xff")
    with pytest.raises(ConfigError, match=r"byte offset 7 is not valid UTF-8"):
        read_chat_template(tmp_path / "bad.jinja")


def test_pydoc_chat_rows_are_real_text_and_deterministic(smol):
    from pydoc_data.topics import topics

    rows = list(pydoc_chat_rows())
    assert rows == list(pydoc_chat_rows()) and len(rows) == len(topics)
    assert [origin for origin, _ in rows] == [f"pydoc-chat:{k}" for k in sorted(topics)]
    chats = [conversation_from_row(row, where=origin) for origin, row in rows]
    assert all(c.messages[-1] == Message("assistant", topics[o[11:]].strip()) for (o, _), c in zip(rows, chats))
    assert sum(c.messages[0].role == "system" for c in chats) == len(rows) // 3
    for chat in chats[:6]:
        rendered = render(chat, smol)
        answer = smol.decode(rendered.input_ids[rendered.mask])
        assert answer == chat.messages[-1].content + "<|im_end|>"
