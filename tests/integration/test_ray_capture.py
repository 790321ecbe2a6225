"""Ray capture on a local 2-CPU cluster: 2 workers, a worker killed part-way, a dead job resumed.

Every store is compared byte for byte with a one-process capture of the same configuration.
The teacher is the tiny offline one: what is under test is the orchestration, not the model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_chat_corpus
from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig
from logitcache.store import inspect_store, verify_store
from logitcache.testing.crash import tree_bytes

ray = pytest.importorskip("ray")

SEQ_LEN = 32
WINDOWS = 12


def make_config(teacher: str, out: Path, workers: int = 0) -> CaptureConfig:
    return CaptureConfig().with_overrides({
        "teacher.model": teacher, "teacher.dtype": "float32", "teacher.device": "cpu", "corpus.seq_len": SEQ_LEN,
        "corpus.max_tokens": SEQ_LEN * WINDOWS, "store.path": str(out), "store.sequences_per_shard": 2,
        "sparsify.method": "hybrid", "sparsify.k": 5, "sparsify.samples": 20, "workers": workers,
        "batch_tokens": 3 * (SEQ_LEN + 1),
    })


@pytest.fixture(scope="module")
def cluster(engine_env, tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    capture(make_config(tiny_teacher, out), progress=False)
    return tree_bytes(out)


def test_two_workers_write_the_single_process_store(cluster, tiny_teacher, reference, tmp_path):
    summary = capture(make_config(tiny_teacher, tmp_path / "s", workers=2), progress=False)
    assert summary.units_written == WINDOWS // 2 and summary.tokens == WINDOWS * SEQ_LEN
    assert tree_bytes(tmp_path / "s") == reference


def test_two_workers_capture_a_chat_corpus_as_one_process_does(cluster, tiny_teacher, tmp_path):
    """The documents layout through Ray: each worker gets its unit's slice of the documents plan."""
    corpus, template = write_chat_corpus(tmp_path)
    over = {"corpus.source": str(corpus), "corpus.chat_template": str(template), "corpus.max_tokens": None,
            "corpus.seq_len": 120, "corpus.long_sequences": "split", "store.sequences_per_shard": 1}
    capture(make_config(tiny_teacher, tmp_path / "one").with_overrides(over), progress=False)
    summary = capture(make_config(tiny_teacher, tmp_path / "two", workers=2).with_overrides(over), progress=False)
    assert summary.units_written >= 4 and inspect_store(tmp_path / "two")["layout"] == "documents"
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


def test_two_workers_generate_and_capture_as_one_process_does(cluster, tiny_teacher, tmp_path):
    """Teacher-generated responses through Ray: seeded per sequence, so the workers' store is the one-process store."""
    corpus, template = write_chat_corpus(tmp_path)
    over = {"corpus.source": str(corpus), "corpus.chat_template": str(template), "corpus.max_tokens": None,
            "corpus.seq_len": 120, "store.sequences_per_shard": 1, "generate.max_new_tokens": 12,
            "generate.n": 2, "generate.top_p": 0.9}
    capture(make_config(tiny_teacher, tmp_path / "one").with_overrides(over), progress=False)
    summary = capture(make_config(tiny_teacher, tmp_path / "two", workers=2).with_overrides(over), progress=False)
    assert summary.units_written >= 4 and inspect_store(tmp_path / "two")["generation"]["responses"] >= 4
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


# Two kill points, the two that leave the most different debris: a half-written shard (mid_write) and a unit committed
# but never reported back to the driver (after_commit). Every other kill point is one process's commit protocol,
# covered without Ray by tests/unit/test_capture.py and tests/integration/test_fault_matrix.py.
@pytest.mark.parametrize("fault", ["mid_write:3", "after_commit:1"])
def test_a_killed_worker_is_replaced_and_the_store_is_identical(cluster, tiny_teacher, reference, tmp_path, fault):
    from logitcache.capture.distributed import capture_distributed

    marker = tmp_path / "killed"
    env = {"LOGITCACHE_FAULT": fault, "LOGITCACHE_FAULT_ONCE": str(marker)}
    summary = capture_distributed(make_config(tiny_teacher, tmp_path / "s", workers=2), progress=False,
                                  worker_env=env)
    assert marker.exists()  # one worker process did SIGKILL itself part-way
    assert summary.units_written == WINDOWS // 2
    assert verify_store(tmp_path / "s").ok
    assert tree_bytes(tmp_path / "s") == reference


def test_a_dead_job_resumes_on_ray(cluster, tiny_teacher, reference, tmp_path):
    out = tmp_path / "s"
    code = ("import sys; from logitcache.capture import capture; from logitcache.capture.config import CaptureConfig; "
            "capture(CaptureConfig.from_dict(eval(sys.argv[1])), progress=False)")
    one_process = make_config(tiny_teacher, out).to_dict()
    killed = subprocess.run([sys.executable, "-c", code, repr(one_process)], capture_output=True, text=True,
                            env=dict(os.environ, LOGITCACHE_FAULT="after_commit:2"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not inspect_store(out)["complete"]
    summary = capture(make_config(tiny_teacher, out, workers=2), progress=False)
    assert summary.units_skipped == 2 and summary.units_written == WINDOWS // 2 - 2
    assert tree_bytes(out) == reference


def test_cli_workers_flag(cluster, tiny_teacher, reference, tmp_path):
    from click.testing import CliRunner

    from logitcache.cli import main

    c = make_config(tiny_teacher, tmp_path / "s")
    args = ["capture", "--teacher", tiny_teacher, "--dtype", "float32", "--device", "cpu", "--seq-len", str(SEQ_LEN),
            "--max-tokens", str(c.corpus.max_tokens), "--out", c.store.path, "--sequences-per-shard", "2",
            "--method", "hybrid", "--k", "5", "--samples", "20", "--workers", "2", "--quiet"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert tree_bytes(tmp_path / "s") == reference
