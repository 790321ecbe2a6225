"""End to end with the real embedded teacher (SmolLM2-135M-Instruct) on the builtin pydoc corpus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from logitcache.testing.crash import tree_bytes

SEQ_LEN = 256
TOKENS = 3 * 1024  # 12 windows, a few thousand tokens


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logitcache.cli", *args], capture_output=True, text=True, **kw)


def capture_args(out: Path, method: str, batch_tokens: int) -> list[str]:
    return ["capture", "--method", method, "--k", "16", "--samples", "50", "--seq-len", str(SEQ_LEN),
            "--max-tokens", str(TOKENS), "--sequences-per-shard", "2", "--batch-tokens", str(batch_tokens),
            "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    for method in ("topk", "sample", "hybrid"):
        result = run_cli(*capture_args(root / method, method, 4 * (SEQ_LEN + 1)))
        assert result.returncode == 0, result.stderr
    return root


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid"])
def test_real_teacher_capture(stores, method):
    info = json.loads(run_cli("inspect", str(stores / method), "--json").stdout)
    assert info["complete"] and info["positions"] == TOKENS and info["shards"] == 6
    assert info["teacher"]["vocab_size"] == 49152 and info["teacher"]["name"] == "embedded:smollm2-135m-instruct"
    assert info["corpus"]["source"] == "builtin:pydoc"
    ids = info["mean_ids_per_position"]
    if method == "topk":
        assert ids == 16
    elif method == "sample":
        assert 1 < ids < 50  # distinct ids among 50 draws from a peaked real distribution
    else:
        assert 16 < ids < 66
    assert run_cli("verify", str(stores / method)).returncode == 0


def test_sigkill_mid_capture_then_resume_is_byte_identical(stores, tmp_path):
    """A real external SIGKILL while the teacher runs; resume; compare with the uninterrupted store."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "logitcache.cli", *capture_args(out, "sample", 2 * (SEQ_LEN + 1))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    commits = out / "commits"
    while time.monotonic() < deadline and proc.poll() is None:
        if commits.is_dir() and len(list(commits.glob("*.json"))) >= 2:
            break
        time.sleep(0.05)  # polling for the child's progress, not waiting for a timing to pass
    assert proc.poll() is None, "capture ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads(run_cli("inspect", str(out), "--json").stdout)
    assert not partial["complete"] and 2 <= partial["shards"] < 6
    # resume with a different batch size: same bytes as the uninterrupted run
    result = run_cli(*capture_args(out, "sample", 3 * (SEQ_LEN + 1)))
    assert result.returncode == 0, result.stderr
    assert tree_bytes(out) == tree_bytes(stores / "sample")


def test_hf_dataset_view(stores):
    from logitcache.store import open_hf_dataset

    ds = open_hf_dataset(stores / "hybrid")
    assert len(ds) == TOKENS // SEQ_LEN
    row = ds[0]
    assert len(row["tokens"]) == SEQ_LEN + 1 and len(row["head_ids"]) == SEQ_LEN * 16
    assert sum(row["sample_lengths"]) == len(row["sample_ids"]) == len(row["sample_counts"])
