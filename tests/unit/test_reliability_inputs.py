"""What a new user hit (issue 19, items 1, 5, 6, 7): a dataset folder read by a stated rule, corpus errors
before the teacher loads, resume by content rather than path spelling, and clear messages (changed method,
missing tokenizer, empty lock, --out a file, SIGINT/SIGTERM, --quiet, BOM, CRLF)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from logitcache.capture import capture
from logitcache.capture.corpus import open_corpus, read_documents
from logitcache.errors import ConfigError, CorpusError, StoreLockedError, StoreMismatchError, TeacherError
from logitcache.store import inspect_store, iter_sequences, read_manifest, verify_store
from logitcache.store.lock import StoreLock
from logitcache.store.manifest import with_header_digest
from logitcache.testing.crash import cli_command, tree_bytes
from logitcache.testing.tiny import write_jsonl
from helpers import cli_args, make_config

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jolly bunch of zebras"


def dataset_folder(root: Path, files: int = 3, rows: int = 20) -> list[str]:
    """A downloaded-dataset layout: a card, a hidden git file, data/*.jsonl; returns the rows' texts in order."""
    texts = []
    for f in range(files):
        rows_f = [f"file {f} row {r}: {WORDS}" for r in range(rows)]
        write_jsonl(root / "data" / f"train-{f:05d}-of-{files:05d}.jsonl", rows_f)
        texts += rows_f
    (root / "README.md").write_text("---\nlicense: mit\n---\n# A dataset card\n", encoding="utf-8")
    (root / ".gitattributes").write_text("*.jsonl filter=lfs\n", encoding="utf-8")
    return texts


@pytest.fixture
def no_teacher(monkeypatch):
    """Any teacher load fails the test: what is checked must be checked before one."""
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the input was checked")

    monkeypatch.setattr("logitcache.capture.pipeline.load_teacher", refuse)
    monkeypatch.setattr("logitcache.capture.distributed._ray", refuse)


# --- 1. a directory is read by a stated rule ---------------------------------------------------------------

def test_dataset_folder_reads_its_data_files_not_its_card(tmp_path):
    expected = dataset_folder(tmp_path / "ds")
    corpus = open_corpus(str(tmp_path / "ds"))
    assert [d.text for d in corpus.documents()] == expected
    assert corpus.kind == "jsonl" and len(corpus.names) == 3 and corpus.names[0] == "data/train-00000-of-00003.jsonl"
    assert corpus.skipped == (".gitattributes (hidden)", "README.md (documentation)")


def test_dataset_folder_capture_lists_the_files_read_and_skipped(tiny_teacher, tmp_path):
    expected = dataset_folder(tmp_path / "ds")
    config = make_config(tiny_teacher, tmp_path / "s", "topk", **{"corpus.source": str(tmp_path / "ds")})
    capture(config, progress=False)
    corpus = inspect_store(tmp_path / "s")["corpus"]
    assert corpus["stats"]["documents"] == len(expected) == 60  # was 1: the README alone
    assert corpus["source"] == str((tmp_path / "ds").resolve())
    assert corpus["input"]["files"] == [f"data/train-{f:05d}-of-00003.jsonl" for f in range(3)]
    assert corpus["input"]["skipped"] == [".gitattributes (hidden)", "README.md (documentation)"]
    shown = subprocess.run(cli_command(["inspect", str(tmp_path / "s")]), capture_output=True, text=True).stdout
    assert "files read     3 jsonl: data/train-00000-of-00003.jsonl" in shown
    assert "files skipped  2: .gitattributes (hidden), README.md (documentation)" in shown


def test_markdown_is_data_only_where_the_data_is_text(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    for name, text in [("README.md", "about these notes"), ("a.md", "note a"), ("b/c.txt", "note c")]:
        (notes / name).parent.mkdir(exist_ok=True)
        (notes / name).write_text(text, encoding="utf-8")
    corpus = open_corpus(str(notes))
    assert [d.text for d in corpus.documents()] == ["note a", "note c"]
    assert corpus.skipped == ("README.md (documentation)",)
    write_jsonl(notes / "rows.jsonl", ["a row"])  # now the Markdown is the data's documentation
    with pytest.raises(CorpusError, match=r"2 kinds: jsonl \(1: rows\.jsonl\); text \(1: b/c\.txt\)"):
        open_corpus(str(notes))


def test_mixed_kinds_are_refused_naming_kinds_files_and_a_glob_that_works(tmp_path):
    expected = dataset_folder(tmp_path / "ds", files=4)
    (tmp_path / "ds" / "dataset_infos.json").write_text(json.dumps({"default": {}}), encoding="utf-8")
    with pytest.raises(CorpusError) as info:
        open_corpus(str(tmp_path / "ds"))
    message = str(info.value)
    assert "2 kinds: json (1: dataset_infos.json); jsonl (4: data/train-00000-of-00004.jsonl" in message
    assert ", ...)" in message  # 4 files, 3 named
    hint = message.split("--corpus '")[1].split("'")[0]
    assert hint == f"{tmp_path / 'ds'}/**/*.jsonl"
    assert [d.text for d in read_documents(hint)] == expected  # the glob it suggests reads the data


def test_glob_must_match_corpus_files_of_one_kind(tmp_path):
    dataset_folder(tmp_path / "ds")
    (tmp_path / "ds" / "data" / "extra.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(CorpusError, match=r"matches 1 files of no corpus kind \(extra\.jsonl\.gz\)"):
        open_corpus(str(tmp_path / "ds" / "data" / "*"))
    with pytest.raises(CorpusError, match="matches no file"):
        open_corpus(str(tmp_path / "ds" / "*.parquet"))


def test_a_folder_of_only_documentation_names_what_it_skipped(tmp_path):
    (tmp_path / "README.md").write_text("card", encoding="utf-8")
    (tmp_path / "train.jsonl.zst").write_bytes(b"(\xb5/\xfd")
    with pytest.raises(CorpusError, match=r"no corpus files \(2 files; skipped: README\.md \(documentation\), "
                                          r"train\.jsonl\.zst \(not a corpus file: suffix '\.zst'\)"):
        open_corpus(str(tmp_path))


# --- 5. corpus and store errors before the teacher loads ----------------------------------------------------

def _deep_bad_jsonl(path: Path) -> str:
    write_jsonl(path, [f"row {i}" for i in range(5000)])
    with path.open("a", encoding="utf-8") as f:
        f.write('{"text": "unterminated\n')
    return str(path)


def _deep_bad_utf8(path: Path) -> str:
    path.write_bytes(b"fine text\n" * 10000 + b"\xff")
    return str(path)


def _csv(path: Path) -> str:
    path.write_text("a,b\n", encoding="utf-8")
    return str(path)


def _blank_dir(path: Path) -> str:
    path.mkdir()
    (path / "a.txt").write_text("  \n\t\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.txt"), "does not exist"),
    (lambda p: _csv(p / "x.csv"), "unknown corpus format"),
    (lambda p: _deep_bad_jsonl(p / "big.jsonl"), r"big\.jsonl:5001: line is not valid JSON"),
    (lambda p: _deep_bad_utf8(p / "big.txt"), "at byte offset 100000 is not valid UTF-8"),
    (lambda p: _blank_dir(p / "blank"), "all 1 documents .* are empty or whitespace-only"),
    (lambda p: str(p / "nothing-*.jsonl"), "matches no file"),
])
def test_corpus_errors_come_before_any_teacher_load(no_teacher, tiny_teacher, tmp_path, make, message):
    source = make(tmp_path)
    for workers in (0, 2):  # in-process, and the Ray job (before Ray starts the workers)
        config = make_config(tiny_teacher, tmp_path / "s", **{"corpus.source": source, "workers": workers})
        with pytest.raises(CorpusError, match=message):
            capture(config, progress=False)
    assert not (tmp_path / "s").exists()


def test_a_good_corpus_does_reach_the_teacher_load(no_teacher, tiny_teacher, tmp_path):
    """The patched loader is the one the capture calls (so the test above shows an order, not a no-op)."""
    with pytest.raises(AssertionError, match="teacher was loaded"):
        capture(make_config(tiny_teacher, tmp_path / "s"), progress=False)


def test_big_corpus_checks_its_first_document_early(monkeypatch, no_teacher, tiny_teacher, tmp_path):
    monkeypatch.setattr("logitcache.capture.corpus.PRESCAN_BYTES", 1000)  # stands in for a corpus > 16 MiB
    source = _deep_bad_jsonl(tmp_path / "big.jsonl")
    with pytest.raises(AssertionError, match="teacher was loaded"):  # line 5001 is left to the plan
        capture(make_config(tiny_teacher, tmp_path / "s", **{"corpus.source": source}), progress=False)
    bad_first = tmp_path / "bad_first.jsonl"
    bad_first.write_text("not json\n" + "\n".join(json.dumps({"text": WORDS}) for _ in range(100)), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad_first\.jsonl:1: line is not valid JSON"):
        capture(make_config(tiny_teacher, tmp_path / "s", **{"corpus.source": str(bad_first)}), progress=False)


# --- 6. resume identity rests on the corpus content ---------------------------------------------------------

def _killed_after_first_commit(config, cwd: Path) -> None:
    env = dict(os.environ, LOGITCACHE_FAULT="after_commit:1")
    args = [*cli_args(config), "--corpus", config.corpus.source]
    done = subprocess.run(cli_command(args), env=env, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not read_manifest(config.store.path).complete


@pytest.fixture
def good_txt(tmp_path) -> Path:
    path = tmp_path / "work" / "good.txt"
    path.parent.mkdir()
    path.write_text(" ".join(WORDS for _ in range(30)), encoding="utf-8")
    return path


def test_same_corpus_by_another_path_resumes_to_identical_bytes(tiny_teacher, tmp_path, good_txt, monkeypatch):
    reference = make_config(tiny_teacher, tmp_path / "ref", **{"corpus.source": str(good_txt)})
    capture(reference, progress=False)
    out = tmp_path / "s"
    _killed_after_first_commit(reference.with_overrides({"store.path": str(out), "corpus.source": "./good.txt"}),
                               cwd=good_txt.parent)
    monkeypatch.chdir(tmp_path)  # another working directory, another spelling of the same file
    capture(reference.with_overrides({"store.path": str(out), "corpus.source": "work/../work/good.txt"}),
            progress=False)
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


def test_a_moved_corpus_resumes_and_the_store_keeps_its_header(tiny_teacher, tmp_path, good_txt):
    reference = make_config(tiny_teacher, tmp_path / "ref", **{"corpus.source": str(good_txt)})
    capture(reference, progress=False)
    out = tmp_path / "s"
    _killed_after_first_commit(reference.with_overrides({"store.path": str(out)}), cwd=tmp_path)
    moved = tmp_path / "elsewhere" / "renamed.txt"  # another mount point, say: same bytes, other path
    moved.parent.mkdir()
    shutil.copy(good_txt, moved)
    summary = capture(reference.with_overrides({"store.path": str(out), "corpus.source": str(moved)}),
                      progress=False)
    assert summary.units_skipped == 1  # the committed unit counts: it is bound to the header the store keeps
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    assert inspect_store(out)["corpus"]["source"] == str(good_txt)


def _as_written_before(store: Path, source: str) -> None:
    """Rewrite a store as logitcache wrote it before this change: the typed path in the identity and in
    ``corpus.source``, no ``corpus.input``, and (as then) commit records without a binding."""
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["identity"]["corpus"] = {"source": source, **manifest["identity"]["corpus"]}
    manifest["corpus"]["source"] = source
    del manifest["corpus"]["input"]
    manifest.pop("header_sha256")
    (store / "manifest.json").write_text(json.dumps(with_header_digest(manifest)))
    for record in (store / "commits").glob("*.json"):
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "binding"}))


def test_a_store_written_before_resumes_when_the_content_matches(tiny_teacher, tmp_path, good_txt):
    reference = make_config(tiny_teacher, tmp_path / "ref", **{"corpus.source": str(good_txt)})
    capture(reference, progress=False)
    out = tmp_path / "s"
    config = reference.with_overrides({"store.path": str(out), "corpus.source": "./good.txt"})
    _killed_after_first_commit(config, cwd=good_txt.parent)
    _as_written_before(out, "./good.txt")
    assert read_manifest(out).header.identity["corpus"]["source"] == "./good.txt"
    summary = capture(reference.with_overrides({"store.path": str(out)}), progress=False)  # not refused
    assert summary.units_total == 4 and verify_store(out).ok
    assert read_manifest(out).header.identity["corpus"]["source"] == "./good.txt"  # its header is kept
    got, want = list(iter_sequences(out)), list(iter_sequences(tmp_path / "ref"))
    assert [(s, t.tolist()) for s, t, _ in got] == [(s, t.tolist()) for s, t, _ in want]
    for (_, _, a), (_, _, b) in zip(got, want):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name


def test_changed_content_under_the_same_path_is_refused(tiny_teacher, tmp_path, good_txt):
    config = make_config(tiny_teacher, tmp_path / "s", **{"corpus.source": str(good_txt)})
    _killed_after_first_commit(config, cwd=tmp_path)
    good_txt.write_text(good_txt.read_text(encoding="utf-8") + " one more sentence", encoding="utf-8")
    with pytest.raises(StoreMismatchError, match="corpus.fingerprint: store has '[0-9a-f]{64}', this run has"):
        capture(config, progress=False)


# --- 7. messages --------------------------------------------------------------------------------------------

def test_changed_method_is_named_as_the_method_before_the_teacher_loads(tiny_teacher, tmp_path, monkeypatch):
    config = make_config(tiny_teacher, tmp_path / "s", "topk")  # params {k}; sample's are {samples, temperature}
    capture(config, progress=False)
    monkeypatch.setattr("logitcache.capture.pipeline.load_teacher", lambda c: pytest.fail("teacher loaded"))
    with pytest.raises(StoreMismatchError, match="identity.sparsify.method: store has 'topk', this run has 'sample'"):
        capture(config.with_overrides({"sparsify.method": "sample"}), progress=False)


def test_teacher_without_a_tokenizer_says_so(tiny_teacher, tmp_path):
    from logitcache.capture.config import TeacherConfig
    from logitcache.capture.teachers import load_teacher

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_teacher) / name, bare / name)
    with pytest.raises(TeacherError) as info:
        load_teacher(TeacherConfig(model=str(bare), dtype="float32"))
    message = str(info.value)
    assert f"{bare} holds no tokenizer (found config.json, model.safetensors; expected tokenizer.json" in message
    assert "sentencepiece" not in message and "tokenizer.save_pretrained" in message


def test_a_model_saved_by_a_later_transformers_major_is_refused_naming_both(tiny_teacher, tmp_path):
    from logitcache.capture.config import TeacherConfig
    from logitcache.capture.teachers import load_teacher
    from logitcache.train.loop import make_student

    later = Path(shutil.copytree(tiny_teacher, tmp_path / "later"))
    config = json.loads((later / "config.json").read_text())
    (later / "config.json").write_text(json.dumps({**config, "transformers_version": "99.1.0"}))
    expected = (rf"{later / 'config.json'} was written by transformers 99\.1\.0; this environment has transformers "
                r"\S+, which reads a later major version's config as another model .* Install transformers >= 99 here")
    with pytest.raises(TeacherError, match=f"teacher '{later}': {expected}"):
        load_teacher(TeacherConfig(model=str(later), dtype="float32"))
    for student in (str(later), f"init:{later}:1"):
        with pytest.raises(ConfigError, match=f"student '{student}': {expected}"):
            make_student(student)
    assert make_student(tiny_teacher).config.vocab_size == config["vocab_size"]  # this version's own files load


def test_a_student_that_is_no_model_directory_says_what_was_found(tiny_teacher, tmp_path):
    from logitcache.train.loop import make_student

    (tmp_path / "notes.txt").write_text("x")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(Path(tiny_teacher) / "config.json", no_weights / "config.json")
    expected = "expected a local Hugging Face model directory .* models are not downloaded"
    cases = {"org/model": "org/model does not exist", str(tmp_path / "notes.txt"): "notes.txt is a file",
             str(tmp_path): f"{tmp_path} holds no config.json \\(found no_weights, notes.txt\\)",
             f"init:{tmp_path / 'gone'}:1": "gone does not exist"}
    for spec, found in cases.items():  # before: transformers tried the hub, or a traceback
        with pytest.raises(ConfigError, match=f"student '{re.escape(spec)}': .*{found}; {expected}"):
            make_student(spec)
    with pytest.raises(ConfigError, match=f"student '{re.escape(str(no_weights))}': cannot load .* as a causal LM"):
        make_student(str(no_weights))


@pytest.mark.parametrize("content, found", [(b"", "is empty"), (b"[1, 2]", "holds b'[1, 2]'"),
                                            (b'{"host": "h"}', "holds b'{\"host\": \"h\"}'")])
def test_a_lock_naming_no_writer_says_so(tmp_path, content, found):
    (tmp_path / ".lock").write_bytes(content)
    with pytest.raises(StoreLockedError) as info:
        with StoreLock(tmp_path):
            pass
    message = str(info.value)
    assert f"lock file {tmp_path / '.lock'} {found}: it names no writer" in message
    assert "None" not in message and "delete the lock file and rerun the same command" in message


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(list(args)), capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("out", ["afile", "afile/store"])
def test_out_pointing_at_a_file_is_one_clear_line(tiny_teacher, tmp_path, out):
    (tmp_path / "afile").write_text("keep me")
    done = run_cli(*cli_args(make_config(tiny_teacher, tmp_path / out)))
    assert done.returncode == 2 and "Errno" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"error: --out '{tmp_path / out}': {tmp_path / 'afile'} is a file, not a "
                                   "directory; a store is a directory (new or existing) or a URL. Choose another "
                                   "--out, or move the file away")
    assert (tmp_path / "afile").read_text() == "keep me"


def _wait_stopped(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``proc`` stopped itself (``LOGITCACHE_FAULT=<point>:<n>:stop``)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_says_what_is_committed_and_how_to_resume(tiny_teacher, tmp_path, sig, code):
    config = make_config(tiny_teacher, tmp_path / "s", **{"store.sequences_per_shard": 2, "batch_tokens": 33})
    env = dict(os.environ, LOGITCACHE_FAULT="after_commit:1:stop")
    # SIGINT back to its default in the child: a test run started in the background of a non-interactive shell
    # inherits SIGINT ignored, and Python then installs no handler (the capture would run to its end)
    proc = subprocess.Popen(cli_command(cli_args(config)), env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_stopped(proc)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err
    committed = len(list((tmp_path / "s" / "commits").glob("*.json")))
    assert 1 <= committed < 5
    assert err.strip().splitlines()[-1] == (f"interrupted by {sig.name}: {committed} of 5 units are committed in "
                                            f"{tmp_path / 's'}; rerun the same command to resume.")
    assert "Traceback" not in err and not (tmp_path / "s" / ".lock").exists() and verify_store(tmp_path / "s").ok
    if sig == signal.SIGTERM:
        resumed = run_cli(*cli_args(config))
        assert resumed.returncode == 0 and f"already committed {committed}" in resumed.stderr
        assert inspect_store(tmp_path / "s")["complete"]


def test_quiet_shows_no_progress_bars(tiny_teacher, tmp_path):
    done = run_cli(*cli_args(make_config(tiny_teacher, tmp_path / "s")))  # cli_args passes --quiet
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr and "it/s" not in done.stderr and "tok/s]" not in done.stderr
    assert done.stderr.startswith("captured ")


BOM = "\ufeff"


def test_a_leading_bom_is_dropped_by_every_text_reader(tiny_tokenizer, tmp_path):
    from logitcache.capture.plan import build_plan

    text = f"{WORDS}\nsecond line"
    (tmp_path / "plain.txt").write_text(text, encoding="utf-8")
    (tmp_path / "bom.txt").write_text(BOM + text, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text(BOM + json.dumps({"text": text}) + "\n", encoding="utf-8")
    plans = {}
    for name in ("plain.txt", "bom.txt", "bom.jsonl"):
        corpus = open_corpus(str(tmp_path / name))
        plans[name] = build_plan(corpus.documents(), tiny_tokenizer, seq_len=4, max_tokens=None)
        assert corpus.manifest_input()["bom_stripped"] == (name != "plain.txt")
    reference = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    for plan in plans.values():
        assert plan.tokens.tolist() == reference
    (tmp_path / "bad.txt").write_bytes(BOM.encode() + b"ab\xff")
    with pytest.raises(CorpusError, match="at byte offset 5 is not valid UTF-8"):  # offsets stay the file's
        list(read_documents(str(tmp_path / "bad.txt")))
    (tmp_path / "utf16.txt").write_bytes(text.encode("utf-16"))
    with pytest.raises(CorpusError, match="UTF-16 byte-order mark"):
        list(read_documents(str(tmp_path / "utf16.txt")))


def test_line_ends_are_kept_and_counted(tiny_teacher, tmp_path):
    text = "one\r\ntwo\r\nthree\nfour\rfive " + WORDS * 3
    (tmp_path / "crlf.txt").write_bytes(text.encode())
    docs = list(read_documents(str(tmp_path / "crlf.txt")))
    assert docs[0].text == text  # the user's data, as the file has it
    config = make_config(tiny_teacher, tmp_path / "s", **{"corpus.source": str(tmp_path / "crlf.txt"),
                                                          "corpus.max_tokens": 64})
    capture(config, progress=False)
    newlines = inspect_store(tmp_path / "s")["corpus"]["input"]["newlines"]
    assert newlines == {"lf": 1, "crlf": 2, "cr": 1}
    shown = run_cli("inspect", str(tmp_path / "s")).stdout
    assert "line ends      kept as found: 1 LF, 2 CRLF, 1 CR" in shown

