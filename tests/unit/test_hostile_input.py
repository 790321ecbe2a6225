"""Hostile input through the real entry point (``logitcache.cli.run``): one line, exit code 2, no traceback.

Malformed YAML, unknown keys (did-you-mean), wrong value types, an absurd seq_len, non-UTF-8 text, a
teacher asking for remote code, a student tokenizer that does not match the store. (Hostile manifests
and commit records: tests/unit/test_corruption.py.)"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from logitcache.capture import capture
from logitcache.cli import run
from logitcache.capture.config import CaptureConfig
from logitcache.store import inspect_store, read_manifest


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``logitcache ARGS`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["logitcache", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run()
        raise SystemExit(0)
    return info.value.code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for fragment in fragments:
        assert fragment in last, last


def base_job(teacher: str, out: Path) -> dict:
    return CaptureConfig().with_overrides({
        "teacher.model": teacher, "teacher.dtype": "float32", "corpus.seq_len": 16, "corpus.max_tokens": 64,
        "store.path": str(out), "store.sequences_per_shard": 2, "sparsify.method": "topk", "sparsify.k": 3}).to_dict()


@pytest.mark.parametrize("text, fragments", [
    ("sparsify: [unclosed\n", ("is not valid YAML",)),
    ("- just\n- a list\n", ("must hold a mapping; found list",)),
    ("kind: train\n", ("has kind 'train'", "expects kind 'capture'")),
    ("sparsify:\n  methd: topk\n", ("unknown config key 'sparsify.methd'", "did you mean 'sparsify.method'?")),
    ("techer:\n  model: x\n", ("unknown config key 'techer'", "did you mean 'teacher'?")),
    ("corpus:\n  seq_len: '512'\n", ("corpus.seq_len must be int; found str '512'",)),
    ("teacher:\n  trust_remote_code: 'false'\n", ("teacher.trust_remote_code must be bool; found str 'false'",)),
    ("sparsify:\n  samples: 1000000\n", ("samples must be an integer in [1, 65535]; found 1000000",)),
    ("corpus: 7\n", ("corpus. must be a mapping; found int",)),
    ("seed: -3\n", ("seed must be an integer >= 0; found -3",)),
])
def test_bad_config_file(monkeypatch, capsys, tmp_path, text, fragments):
    (tmp_path / "c.yaml").write_text(text)
    assert_one_line(*run_cli(monkeypatch, capsys, "capture", "--config", str(tmp_path / "c.yaml")), *fragments)


def test_missing_config_file(monkeypatch, capsys, tmp_path):
    code, err = run_cli(monkeypatch, capsys, "capture", "--config", str(tmp_path / "nope.yaml"))
    assert_one_line(code, err, "cannot read config file")


def test_absurd_seq_len_is_refused_before_any_write(monkeypatch, capsys, tiny_teacher, tmp_path):
    job = base_job(tiny_teacher, tmp_path / "s")
    job["corpus"]["seq_len"] = 10**9
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(job))
    code, err = run_cli(monkeypatch, capsys, "capture", "--config", str(tmp_path / "c.yaml"), "--quiet")
    assert_one_line(code, err, "seq_len = 1000000000", "exceeds the teacher's max_positions = 256")
    assert not (tmp_path / "s").exists()


def test_non_utf8_corpus_names_the_file_and_offset(monkeypatch, capsys, tiny_teacher, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("hello world " * 50)
    (corpus / "bad.txt").write_bytes(b"valid start \xff\xfe then garbage")
    job = base_job(tiny_teacher, tmp_path / "s")
    job["corpus"]["source"] = str(corpus)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(job))
    code, err = run_cli(monkeypatch, capsys, "capture", "--config", str(tmp_path / "c.yaml"), "--quiet")
    assert_one_line(code, err, "bad.txt", "UTF-8", "12")
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.fixture(scope="module")
def remote_code_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher with its own model class in a local module (auto_map), as remote-code models ship."""
    path = tmp_path_factory.mktemp("remote") / "teacher"
    shutil.copytree(tiny_teacher, path)
    (path / "custom_llama.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="custom_llama", architectures=["CustomForCausalLM"],
               auto_map={"AutoConfig": "custom_llama.CustomConfig",
                         "AutoModelForCausalLM": "custom_llama.CustomForCausalLM"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_remote_code_teacher_refused_unless_allowed(monkeypatch, capsys, remote_code_teacher, tmp_path):
    job = base_job(str(remote_code_teacher), tmp_path / "s")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(job))
    code, err = run_cli(monkeypatch, capsys, "capture", "--config", str(tmp_path / "c.yaml"), "--quiet")
    assert_one_line(code, err, "needs its own Python code", "auto_map", "--trust-remote-code")
    assert not (tmp_path / "s").exists()
    code, err = run_cli(monkeypatch, capsys, "capture", "--config", str(tmp_path / "c.yaml"), "--quiet",
                        "--trust-remote-code")
    assert code == 0, err
    assert inspect_store(tmp_path / "s")["complete"]


def test_student_tokenizer_not_matching_the_store_is_refused(monkeypatch, capsys, tiny_teacher, tmp_path):
    from logitcache.testing.tiny import make_tiny_teacher

    store = tmp_path / "s"
    capture(CaptureConfig.from_dict(base_job(tiny_teacher, store)), progress=False)
    student = make_tiny_teacher(tmp_path / "student", vocab_size=280)  # another vocabulary
    from transformers import AutoTokenizer

    from logitcache.capture.plan import tokenizer_fingerprint

    theirs = tokenizer_fingerprint(AutoTokenizer.from_pretrained(student))
    ours = read_manifest(store).header.tokenizer.fingerprint
    code, err = run_cli(monkeypatch, capsys, "train", "--store", str(store), "--student", student,
                        "--out", str(tmp_path / "run"), "--steps", "1", "--quiet")
    assert_one_line(code, err, "tokenizer mismatch", ours, theirs)
