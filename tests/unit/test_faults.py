"""Crash safety of a one-process capture: kills at random fault points, external SIGKILL, readers and
a second writer during a paused capture, stale locks. The full 20-point run is
tests/integration/test_fault_matrix.py; this is its light subset."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from logitcache.capture import capture
from logitcache.cli import main
from logitcache.capture.config import CaptureConfig
from logitcache.train.dataset import CacheDataset
from logitcache.errors import StoreLockedError
from logitcache.store import inspect_store, verify_store
from logitcache.store.reader import iter_sequences
from logitcache.testing.crash import CATEGORIES, choose_events, cli_command, job_args, \
    kill_after_events, lost_and_duplicated, run_with_fault, traced_run, tree_bytes

SEQ_LEN = 32
SEQUENCES_PER_SHARD = 2


def crash_config(teacher: str, out: Path, units: int = 4) -> CaptureConfig:
    return CaptureConfig().with_overrides({
        "teacher.model": teacher, "teacher.dtype": "float32", "teacher.head_chunk": 16,
        "corpus.seq_len": SEQ_LEN, "corpus.max_tokens": SEQ_LEN * SEQUENCES_PER_SHARD * units,
        "store.path": str(out), "store.sequences_per_shard": SEQUENCES_PER_SHARD,
        "sparsify.method": "hybrid", "sparsify.k": 5, "sparsify.samples": 20, "batch_tokens": 2 * (SEQ_LEN + 1)})


@pytest.fixture(scope="module")
def traced(tiny_teacher, tmp_path_factory):
    """An uninterrupted, traced capture: (config, its fault events); its store is the reference."""
    root = tmp_path_factory.mktemp("crash")
    config = crash_config(tiny_teacher, root / "ref")
    events = traced_run(job_args(config, root / "ref.yaml"), root / "trace.txt")
    return config, events


def resume_in_process(config: CaptureConfig, out: Path):
    return capture(config.with_overrides({"store.path": str(out)}), progress=False)


def test_trace_reaches_every_category(traced):
    _, events = traced
    cats = {e.category for e in events}
    assert set(CATEGORIES) <= cats
    assert sum(e.point == "teacher_chunk" for e in events) == 8 * 2  # 8 windows x 2 head chunks


@pytest.mark.parametrize("trial", range(len(CATEGORIES)))
def test_sigkill_at_a_random_point_then_resume_is_byte_identical(traced, tmp_path, trial):
    config, events = traced
    event = choose_events(events, {c: 1 for c in CATEGORIES}, seed=7)[trial]
    out = tmp_path / "s"
    killed = run_with_fault(job_args(config.with_overrides({"store.path": str(out)}), tmp_path / "j.yaml"),
                            event.spec)
    assert killed.returncode == -signal.SIGKILL, (event, killed.stderr[-2000:])
    if (out / "manifest.json").exists():
        assert verify_store(out).ok  # what is recorded is sound
    summary = resume_in_process(config, out)
    assert summary.units_written + summary.units_skipped == 4
    assert tree_bytes(out) == tree_bytes(config.store.path), event
    assert lost_and_duplicated(out, config.store.path) == (0, 0)


def test_external_sigkill_at_a_random_time_then_resume(traced, tmp_path):
    config, events = traced
    out = tmp_path / "s"
    after = random.Random(11).randrange(1, len(events))
    code = kill_after_events(job_args(config.with_overrides({"store.path": str(out)}), tmp_path / "j.yaml"), after)
    assert code in (-signal.SIGKILL, None)
    resume_in_process(config, out)
    assert tree_bytes(out) == tree_bytes(config.store.path)


def _start_paused(config: CaptureConfig, out: Path, job: Path, stop_at: str) -> subprocess.Popen:
    """A capture process stopped by SIGSTOP at ``stop_at`` (waits for the stop: no sleeping)."""
    env = dict(os.environ, LOGITCACHE_FAULT=f"{stop_at}:stop")
    proc = subprocess.Popen(cli_command(job_args(config.with_overrides({"store.path": str(out)}), job)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"capture ended before reaching {stop_at}: {proc.stderr.read()[-2000:]}"
    return proc


def _assert_reads_first_units(out: Path, reference: str, units: int) -> None:
    ref = list(iter_sequences(reference))[:units * SEQUENCES_PER_SHARD]
    items = list(CacheDataset(out))
    assert [i["seq_id"] for i in items] == [r[0] for r in ref]
    for item, (_, tokens, targets) in zip(items, ref):
        assert item["input_ids"].tolist() == tokens[:-1].tolist()
        assert torch.equal(item["targets"].head_logprobs, targets.head_logprobs)
        assert torch.equal(item["targets"].sample_ids, targets.sample_ids)


def test_readers_and_a_second_writer_during_a_paused_capture(traced, tmp_path):
    config, _ = traced
    out = tmp_path / "s"
    proc = _start_paused(config, out, tmp_path / "j.yaml", "after_commit:2")
    try:
        # a reader (this process) sees exactly the two committed units, nothing of unit 2
        _assert_reads_first_units(out, config.store.path, units=2)
        assert verify_store(out).ok and not inspect_store(out)["complete"]
        # a second writer is refused, naming the owner's host and pid
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid} on host {socket.gethostname()}"):
            resume_in_process(config, out)
        second = subprocess.run(cli_command(job_args(config.with_overrides({"store.path": str(out)}),
                                                     tmp_path / "j2.yaml")), capture_output=True, text=True)
        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]  # (the lines before are the teacher's loading bar)
        assert last.startswith("error: store") and f"pid {proc.pid}" in last and "Traceback" not in second.stderr
    finally:
        proc.send_signal(signal.SIGCONT)
        code = proc.wait()
    assert code == 0, proc.stderr.read()
    assert tree_bytes(out) == tree_bytes(config.store.path)


def test_a_half_written_shard_is_invisible_and_cleaned_up_on_resume(traced, tmp_path):
    config, events = traced
    mid = next(e for e in events if e.point == "mid_write" and e.detail == "shards/00002.arrow")
    out = tmp_path / "s"
    proc = _start_paused(config, out, tmp_path / "j.yaml", mid.spec)
    try:
        temps = list((out / "shards").glob(".00002.arrow.*.tmp"))
        assert len(temps) == 1 and 0 < temps[0].stat().st_size
        _assert_reads_first_units(out, config.store.path, units=2)
        assert verify_store(out).ok
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / ".lock").exists() and temps[0].exists()  # what the killed writer left behind
    resume_in_process(config, out)  # takes over the stale lock, removes the temp file
    assert tree_bytes(out) == tree_bytes(config.store.path)


def test_lock_of_another_host_is_refused_until_deleted(traced, tmp_path):
    config, _ = traced
    out = tmp_path / "s"
    killed = run_with_fault(job_args(config.with_overrides({"store.path": str(out)}), tmp_path / "j.yaml"),
                            "after_commit:1")
    assert killed.returncode == -signal.SIGKILL
    (out / ".lock").write_text(json.dumps({"host": "other-host", "pid": 4242}))
    result = CliRunner().invoke(main, job_args(config.with_overrides({"store.path": str(out)}), tmp_path / "j.yaml"))
    assert isinstance(result.exception, StoreLockedError)
    assert "pid 4242 on host other-host" in str(result.exception) and "delete the lock file" in str(result.exception)
    (out / ".lock").unlink()  # the documented recovery once the other host's writer is known to be gone
    assert resume_in_process(config, out).units_skipped == 1
    assert tree_bytes(out) == tree_bytes(config.store.path)


READER = """
import sys
from logitcache.train.dataset import CacheDataset
print(CacheDataset(sys.argv[1]).num_sequences)
"""


def test_reader_racing_the_finalize_sees_every_unit(traced, tmp_path):
    """A reader that read the incomplete manifest just before the capture finalized (and removed the
    commit records) must not come back empty or crash: it re-reads the now final manifest."""
    import sys

    config, _ = traced
    out = tmp_path / "s"
    writer = _start_paused(config, out, tmp_path / "j.yaml", "before_finalize:1")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, LOGITCACHE_FAULT="reader_commits:1:stop"))
    try:
        _, status = os.waitpid(reader.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)  # the reader holds the incomplete manifest, has not listed commits yet
        writer.send_signal(signal.SIGCONT)
        assert writer.wait() == 0
        assert not (out / "commits").exists()  # finalized: commit records gone
    finally:
        reader.send_signal(signal.SIGCONT)
        stdout, stderr = reader.communicate()
    assert reader.returncode == 0, stderr[-2000:]
    assert int(stdout) == 4 * SEQUENCES_PER_SHARD
