"""The chat path end to end with the real embedded teacher: ``logitcache capture --corpus builtin:pydoc-chat``
(SmolLM2's own ChatML template), then a student trained from that store padding-free by ``logitcache train``
and by the HF ``Trainer`` (:class:`KDTrainer`).

The stored sequences are checked against Hugging Face's own ``apply_chat_template(tokenize=True)`` (not
logitcache's renderer), and the trained labels against the assistant text they must spell."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitcache.capture.chat import pydoc_chat_rows
from logitcache.cli import main
from logitcache.models.embedded import EMBEDDED_TEACHER, resolve_teacher_path
from logitcache.store import inspect_store, iter_sequences, verify_store
from logitcache.train.loop import make_student

SEQ_LEN = 256
STUDENT = f"init:{EMBEDDED_TEACHER}:1"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chat_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "store"
    result = CliRunner().invoke(main, ["capture", "--corpus", "builtin:pydoc-chat", "--seq-len", str(SEQ_LEN),
                                       "--max-tokens", "2500", "--dtype", "float32", "--method", "sample",
                                       "--samples", "20", "--sequences-per-shard", "4", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_teacher_path(EMBEDDED_TEACHER))


def test_the_cli_capture_stores_each_conversation_with_targets_on_assistant_tokens(chat_store, tokenizer):
    info = inspect_store(chat_store)
    assert info["layout"] == "documents" and info["complete"] and verify_store(chat_store).ok
    layout, stats = info["corpus"]["layout"], info["corpus"]["stats"]
    assert layout["train_on"] == "assistant" and len(layout["chat_template_sha256"]) == 64
    rows = dict(pydoc_chat_rows())
    conversations = [row["messages"] for _, row in rows.items()]
    seen = 0
    for n, (seq_id, tokens, mask, targets) in enumerate(iter_sequences(chat_store, with_mask=True)):
        messages = conversations[n]  # no pydoc-chat conversation lacks an assistant turn: none skipped
        whole = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        assert tokens.tolist() == whole[: SEQ_LEN + 1]
        assert targets.num_positions == int(mask.sum()) > 0
        answer = messages[-1]["content"] + "<|im_end|>"
        spelled = tokenizer.decode(tokens[1:][mask].tolist())
        assert answer.startswith(spelled) and len(spelled) > 0  # the trained labels are the answer, in order
        assert "<|im_start|>" not in spelled
        seen += 1
    assert seen == info["sequences"] == stats["sequences"] and stats["truncated"] >= 1


def test_logitcache_train_padding_free_from_the_chat_store(chat_store, tmp_path):
    result = CliRunner().invoke(main, ["train", "--store", str(chat_store), "--student", STUDENT, "--out",
                                       str(tmp_path / "run"), "--steps", "3", "--batch-size", "2", "--eval-every", "0",
                                       "--padding-free", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["step"] == 3 and np.isfinite(summary["final_loss"])


def test_kd_trainer_padding_free_from_the_chat_store(chat_store, tmp_path):
    from transformers import TrainingArguments

    from logitcache import CacheDataset
    from logitcache.train.hf_trainer import KDTrainer

    student = make_student(STUDENT)
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    ds = CacheDataset(chat_store, shuffle=True, seed=0, batch_size=2)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=2,
                             remove_unused_columns=False, report_to=[], use_cpu=True, dataloader_num_workers=0,
                             save_strategy="no", logging_steps=1, learning_rate=1e-3)
    trainer = KDTrainer(model=student, args=args, train_dataset=ds, data_collator=ds.collate_packed, kd_alpha=0.5)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and all(np.isfinite(losses))
    changed = [k for k, v in student.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
