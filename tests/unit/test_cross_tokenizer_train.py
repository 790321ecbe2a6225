"""Cross-tokenizer mode of the trainers (logitcache/train/loop.py, hf_trainer.py, cross_tokenizer.py): the
ordinary path still refuses a student of another tokenizer, cross-tokenizer mode is asked for explicitly, the
teacher tokenizer is found through the store's manifest, and the combinations that do not work are refused
with what to do instead."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers import tiny_store
from logitcache.errors import ConfigError, StoreError
from logitcache.models.tokenizers import tokenizer_fingerprint
from logitcache.train.cross_tokenizer import CrossTokenizerTransform, load_tokenizer
from logitcache.train.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory) -> str:
    from logitcache.testing.tokenizers import make_unigram_tokenizer

    out = tmp_path_factory.mktemp("unigram")
    make_unigram_tokenizer().save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def store(tiny_teacher, tmp_path_factory) -> str:
    return tiny_store(tiny_teacher, tmp_path_factory.mktemp("xtok_store") / "s", sequences=8, sequences_per_shard=4)


@pytest.fixture(scope="module")
def student_dir(unigram_dir, tmp_path_factory) -> str:
    """A tiny Llama with the Unigram vocabulary, shipping the Unigram tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(unigram_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64))
    out = tmp_path_factory.mktemp("student")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def config(store, student, out, **over) -> TrainConfig:
    return TrainConfig(**{"store": store, "student": student, "out": str(out), "batch_size": 4, "steps": 2,
                          "eval_every": 0, **over})


def test_ordinary_path_refuses_another_tokenizer(store, student_dir, unigram_dir, tmp_path):
    """Without --student-tokenizer, the student's tokenizer must be the store's; with it, the run trains."""
    with pytest.raises(StoreError, match="tokenizer mismatch"):
        train(config(store, student_dir, tmp_path / "a"), progress=False)
    result = train(config(store, student_dir, tmp_path / "b", student_tokenizer=unigram_dir), progress=False)
    assert result["step"] == 2
    saved = json.loads((tmp_path / "b" / "train_state.json").read_text())["config"]
    assert saved["student_tokenizer"] == unigram_dir
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path / "b"))) == tokenizer_fingerprint(load_tokenizer(unigram_dir))
    with pytest.raises(ConfigError, match="config field 'student_tokenizer'"):  # a resume keeps the mode
        train(config(store, student_dir, tmp_path / "b", steps=3), progress=False)


def test_teacher_tokenizer_from_the_manifest_or_given(store, tiny_teacher, tiny_tokenizer, unigram_dir, tmp_path):
    found = CrossTokenizerTransform.for_store(store, unigram_dir)  # the manifest names the teacher's directory
    assert found.teacher_fingerprint == tokenizer_fingerprint(tiny_tokenizer)
    moved = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, moved)
    elsewhere = tiny_store(str(moved), tmp_path / "s", sequences=2, sequences_per_shard=2)
    shutil.rmtree(moved)  # the teacher is not on this machine
    with pytest.raises(ConfigError, match="has no tokenizer here .*--teacher-tokenizer PATH"):
        CrossTokenizerTransform.for_store(elsewhere, unigram_dir)
    given = CrossTokenizerTransform.for_store(elsewhere, unigram_dir, tiny_teacher)
    assert given.teacher_fingerprint == found.teacher_fingerprint
    with pytest.raises(StoreError, match="tokenizer mismatch"):  # a given teacher tokenizer is checked too
        CrossTokenizerTransform.for_store(store, unigram_dir, unigram_dir)


@pytest.mark.parametrize("over,message", [
    ({"padding_free": True}, "padding_free: cross-tokenizer batches are padded"),
    ({"kind": "ghost"}, "kind 'ghost': the cross-tokenizer loss is its own"),
    ({"student_tokenizer": None, "teacher_tokenizer": "x"}, "teacher_tokenizer 'x' is only used with student_tokenizer"),
])
def test_loop_refuses(store, student_dir, unigram_dir, tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        config(store, student_dir, tmp_path, **{"student_tokenizer": unigram_dir, **over})


def test_loop_refuses_a_student_built_for_another_tokenizer(store, tiny_teacher, unigram_dir, tmp_path):
    with pytest.raises(ConfigError, match="ships a tokenizer with fingerprint .* Pass the tokenizer the student"):
        train(config(store, f"init:{tiny_teacher}:1", tmp_path, student_tokenizer=unigram_dir), progress=False)


def test_cli_flags_and_bad_tokenizer_path(store, student_dir, unigram_dir, tmp_path):
    from logitcache.cli import main

    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    done = CliRunner().invoke(main, ["train", "--store", store, "--student", student_dir, "--out", str(tmp_path / "o"),
                                     "--student-tokenizer", str(bad), "--steps", "1", "--quiet"])
    assert isinstance(done.exception, ConfigError) and f"student tokenizer {bad}: cannot be loaded" in str(done.exception)
    done = CliRunner().invoke(main, ["train", "--store", store, "--student", student_dir, "--out", str(tmp_path / "o"),
                                     "--student-tokenizer", unigram_dir, "--steps", "1", "--batch-size", "2", "--quiet"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 1


def test_kd_trainer_refuses(store, tiny_tokenizer, student_dir, unigram_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from logitcache.train.dataset import CacheDataset
    from logitcache.train.hf_trainer import KDTrainer, training_args_defaults

    transform = CrossTokenizerTransform(tiny_tokenizer, load_tokenizer(unigram_dir), cache=False)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                             **training_args_defaults())
    fingerprint = tokenizer_fingerprint(tiny_tokenizer)

    def make(**kw):
        ds = kw.pop("ds", None) or CacheDataset(store, tokenizer_fingerprint=fingerprint)
        return KDTrainer(model=model, args=kw.pop("args", args), train_dataset=ds,
                         cross_tokenizer=kw.pop("transform", transform), **kw)

    with pytest.raises(ConfigError, match="kd_kind: found 'ghost', expected 'auto' with cross_tokenizer"):
        make(kd_kind="ghost")
    with pytest.raises(ConfigError, match="kd_impl must be one of plain, compiled .plain with cross_tokenizer"):
        make(kd_impl="compiled")
    with pytest.raises(ConfigError, match="kd_impl must be one of plain, compiled"):
        make(kd_impl="fused", transform=None)
    with pytest.raises(ConfigError, match="data_collator: found .* expected none"):
        make(data_collator=CacheDataset(store).collate)
    with pytest.raises(ConfigError, match="pack_tokens: found 32, expected None with cross_tokenizer"):
        make(ds=CacheDataset(store, pack_tokens=32, tokenizer_fingerprint=fingerprint),
             args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1,
                                    use_cpu=True, **training_args_defaults()))
    with pytest.raises(StoreError, match="tokenizer mismatch"):
        make(transform=CrossTokenizerTransform(load_tokenizer(unigram_dir), tiny_tokenizer, cache=False))
    assert make().get_train_dataloader().collate_fn == transform.collate
