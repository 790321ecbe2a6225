"""Cross-tokenizer training end to end (issue #16): a store captured by ``logitcache capture --label-logprobs``
with the tiny teacher (byte-level BPE), and a student with the offline Unigram tokenizer (another family),
trained by ``logitcache train --student-tokenizer`` (the plain loop) and by ``KDTrainer(cross_tokenizer=...)``:
the training loss goes down, and the held-out CE in the student's tokens and the KL to the teacher on aligned
positions go down."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from helpers import subprocess_env
from pydoc_data.topics import topics

from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig
from logitcache.models.tokenizers import tokenizer_fingerprint
from logitcache.train.cross_tokenizer import CrossTokenizerTransform, evaluate_cross_tokenizer, load_tokenizer

SEQ_LEN, SEQUENCES, STEPS = 48, 16, 40

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_student(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def test_student_with_another_tokenizer_trains_by_cli_and_kd_trainer(tiny_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from logitcache.cli import main
    from logitcache.testing.tokenizers import make_unigram_tokenizer
    from logitcache.train.dataset import CacheDataset
    from logitcache.train.hf_trainer import KDTrainer, training_args_defaults

    store, heldout = tmp_path / "rskd", tmp_path / "heldout"
    cmd = [sys.executable, "-m", "logitcache.cli", "capture", "--teacher", tiny_teacher, "--dtype", "float32",
           "--seq-len", str(SEQ_LEN), "--max-tokens", str(SEQ_LEN * SEQUENCES), "--method", "sample", "--samples",
           "20", "--label-logprobs", "--out", str(store), "--sequences-per-shard", "8", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    assert done.returncode == 0, done.stderr
    text = tmp_path / "heldout.txt"
    text.write_text("".join(topics[name] for name in ("while", "with", "yield")))  # pydoc topics trained last
    capture(CaptureConfig().with_overrides({  # a top-64 reference of other text: held-out CE and KL
        "teacher.model": tiny_teacher, "teacher.dtype": "float32", "corpus.source": str(text),
        "corpus.seq_len": SEQ_LEN, "corpus.max_tokens": SEQ_LEN * 8, "store.path": str(heldout),
        "sparsify.method": "topk", "sparsify.k": 64}), progress=False)
    student_tokenizer = tmp_path / "unigram"
    make_unigram_tokenizer().save_pretrained(student_tokenizer)
    initial = tmp_path / "initial"
    tiny_student(len(load_tokenizer(str(student_tokenizer)))).save_pretrained(initial)
    transform = CrossTokenizerTransform.for_store(str(store), str(student_tokenizer))  # teacher from the manifest
    before = evaluate_cross_tokenizer(AutoModelForCausalLM.from_pretrained(initial), str(heldout), transform)
    assert before["kd_tokens"] > 0

    out = tmp_path / "cli"
    done = CliRunner().invoke(main, ["train", "--store", str(store), "--student", str(initial), "--out", str(out),
                                     "--student-tokenizer", str(student_tokenizer), "--eval-store", str(heldout),
                                     "--steps", str(STEPS), "--eval-every", str(STEPS // 2), "--batch-size", "4",
                                     "--lr", "3e-3", "--quiet"])
    assert done.exit_code == 0, done.output
    evals = json.loads((out / "train_state.json").read_text())["evals"]
    assert [e["step"] for e in evals] == [STEPS // 2, STEPS]
    assert evals[-1]["ce"] < before["ce"] - 0.5 and evals[-1]["kl"] < 0.7 * before["kl"], (before, evals)
    cli_loss = float(json.loads(done.stdout.strip().splitlines()[-1])["final_loss"])

    ds = CacheDataset(str(store), shuffle=True, seed=0, batch_size=4, tokenizer_fingerprint=transform.teacher_fingerprint)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=3e-3, logging_steps=5, save_strategy="no", use_cpu=True,
                             **training_args_defaults())
    trainer = KDTrainer(model=AutoModelForCausalLM.from_pretrained(initial), args=args, train_dataset=ds,
                        cross_tokenizer=transform, kd_alpha=0.5)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.85 * losses[0], losses
    after = evaluate_cross_tokenizer(trainer.model, str(heldout), transform)
    assert after["ce"] < before["ce"] - 0.5 and after["kl"] < 0.7 * before["kl"], (before, after)
    assert abs(losses[-1] - cli_loss) < 0.5 * cli_loss  # the two trainers reach a similar loss
    assert transform.teacher_fingerprint == tokenizer_fingerprint(load_tokenizer(tiny_teacher))
