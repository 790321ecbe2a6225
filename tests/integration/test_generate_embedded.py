"""Teacher-generated responses with the real embedded teacher (SmolLM2-135M-Instruct, its own ChatML template) on a
few ``builtin:pydoc-chat`` prompts: ``logitcache capture --generate-...`` then ``export-generations``.

Checked against references built outside the generation path: the prompts against Hugging Face's own
``apply_chat_template(add_generation_prompt=True)``; each greedy response token against the argmax of the
captured distribution (the full forward) at its position; the targets over each response against a second,
ordinary chat capture of the exported conversations (the documents path, ``--train-on last-assistant``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitcache.capture.chat import pydoc_chat_rows
from logitcache.capture.export import iter_generated
from logitcache.cli import main
from logitcache.models.embedded import EMBEDDED_TEACHER, resolve_teacher_path
from logitcache.store import inspect_store, iter_sequences, verify_store

SEQ_LEN, NEW = 256, 48
COMMON = ["--seq-len", str(SEQ_LEN), "--dtype", "float32", "--method", "topk", "--k", "8", "--sequences-per-shard",
          "2", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    work = tmp_path_factory.mktemp("generate")
    out = work / "store"
    result = CliRunner().invoke(main, ["capture", "--corpus", "builtin:pydoc-chat", "--max-tokens", "120",
                                       "--generate-max-new-tokens", str(NEW), "--generate-temperature", "0",
                                       "--generate-stop", ".", "--generate-stop", "never seen §§", "--out",
                                       str(out), *COMMON])
    assert result.exit_code == 0, result.output
    export = CliRunner().invoke(main, ["export-generations", str(out), str(work / "sft.jsonl")])
    assert export.exit_code == 0, export.output
    return out, work / "sft.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_teacher_path(EMBEDDED_TEACHER))


def test_greedy_responses_follow_the_captured_distribution(generated, tokenizer):
    store, export = generated
    info = inspect_store(store)
    assert verify_store(store).ok and info["complete"] and info["layout"] == "documents"
    stats = info["generation"]
    assert stats["responses"] == info["sequences"] >= 3 and stats["stop_string_hits"]["never seen §§"] == 0
    conversations = [row["messages"] for _, row in pydoc_chat_rows()]
    lines = [json.loads(line) for line in export.read_text(encoding="utf-8").splitlines()]
    rows = list(iter_sequences(store, with_mask=True))
    for n, ((seq_id, tokens, mask, targets), row, line) in enumerate(zip(rows, iter_generated(store), lines,
                                                                       strict=True)):
        prompt = conversations[n][:-1]  # pydoc-chat: (system), user, assistant; the prompt ends at the user turn
        reference = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert tokens[:row.prompt_length].tolist() == list(reference["input_ids"])
        assert mask.tolist() == [t >= row.prompt_length - 1 for t in range(tokens.size - 1)]
        assert torch.equal(targets.head_ids[:, 0].long(), torch.from_numpy(row.response.astype(np.int64)))
        text = tokenizer.decode((row.response[:-1] if row.finish == "stop" else row.response).tolist())
        assert line["messages"] == [*prompt, {"role": "assistant", "content": text}]
        assert (line["finish_reason"], line["completion_tokens"]) == (row.finish, row.response.size)
        if row.finish == "stop":
            assert row.response[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        if row.finish == "stop-string":
            assert "." in text and "." not in tokenizer.decode(row.response[:-1].tolist())
    assert sum(stats["finish_reasons"].values()) == len(rows)


def test_targets_over_a_response_equal_a_chat_capture_of_the_exported_conversation(generated, tmp_path):
    store, export = generated
    again = tmp_path / "again"
    result = CliRunner().invoke(main, ["capture", "--corpus", str(export), "--train-on", "last-assistant", "--out",
                                       str(again), *COMMON])
    assert result.exit_code == 0, result.output
    compared = 0
    for (_, tokens, mask, targets), (_, chat_tokens, chat_mask, chat_targets) in zip(
            iter_sequences(store, with_mask=True), iter_sequences(again, with_mask=True), strict=True):
        if chat_tokens[:tokens.size].tolist() != tokens.tolist():
            continue  # the decoded text re-tokenizes otherwise: the store, not the text, holds the exact tokens
        assert chat_mask[:mask.size].tolist() == mask.tolist()
        responses = int(mask.sum())
        assert torch.equal(chat_targets.head_ids[:responses], targets.head_ids)
        assert torch.allclose(chat_targets.head_logprobs[:responses], targets.head_logprobs, atol=1e-5)
        compared += 1
    assert compared >= 2
