"""Capture end to end with the tiny teacher: exactly-once, resume after SIGKILL, byte identity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitcache.capture import capture
from logitcache.cli import main
from logitcache.errors import CorpusError, StoreMismatchError
from logitcache.store import inspect_store, iter_sequences, open_hf_dataset, read_manifest, verify_store
from logitcache.testing.crash import tree_bytes
from helpers import SEQ_LEN, cli_args, make_config


@pytest.fixture(scope="module")
def reference_stores(tiny_teacher, tmp_path_factory):
    """One uninterrupted store per method (batch of 4 windows)."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for method in ("topk", "sample", "hybrid"):
        config = make_config(tiny_teacher, root / method, method, batch_tokens=4 * (SEQ_LEN + 1))
        capture(config, progress=False)
        out[method] = config
    return out


@pytest.mark.parametrize("method", ["topk", "sample", "hybrid"])
def test_store_is_sound_and_summarised(reference_stores, method):
    config = reference_stores[method]
    root = Path(config.store.path)
    assert verify_store(root).ok
    info = inspect_store(root)
    assert info["complete"] and info["shards"] == 4 and info["sequences"] == 10
    assert info["positions"] == 10 * SEQ_LEN
    assert info["method"] == method and info["seq_len"] == SEQ_LEN
    expected_ids = {"topk": 5.0}.get(method)
    if expected_ids:
        assert info["mean_ids_per_position"] == expected_ids
    assert 0 < info["bytes_per_position"] < 200
    assert len(open_hf_dataset(root)) == 10


@pytest.mark.parametrize(("batch_windows", "threads"), [(1, 1), (7, 1), (4, 3)])
def test_other_batch_size_gives_identical_bytes(reference_stores, tiny_teacher, tmp_path, batch_windows, threads):
    """Batch size and the number of encode threads (units committed out of order) change no byte."""
    ref = reference_stores["hybrid"]
    config = make_config(tiny_teacher, tmp_path / "s", "hybrid", batch_tokens=batch_windows * (SEQ_LEN + 1),
                         encode_threads=threads)
    capture(config, progress=False)
    assert tree_bytes(tmp_path / "s") == tree_bytes(Path(ref.store.path))


def test_stored_targets_match_the_teacher(reference_stores, tiny_teacher):
    """The topk store holds exactly log_softmax of the teacher's own logits (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    seq_id, tokens, targets = next(iter_sequences(reference_stores["topk"].store.path))
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.from_numpy(tokens[None, :-1]).long()).logits[0].float(), -1)
    ref_lp, ref_ids = logp.topk(5, dim=-1)
    torch.testing.assert_close(targets.head_logprobs, ref_lp, rtol=0, atol=1e-5)
    assert torch.equal(targets.head_ids.long(), ref_ids)
    torch.testing.assert_close(targets.tail_mass, 1 - ref_lp.exp().sum(-1), rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["topk", "sample", "hybrid"])
def test_capture_on_cuda_matches_cpu(reference_stores, tiny_teacher, tmp_path, method):
    """Teacher, head and sparsifier on the GPU; the store agrees with the CPU capture: same head ids
    and logprobs within fp32 reduction-order noise, same draws wherever the two CDFs agree."""
    ref = reference_stores[method]
    config = make_config(tiny_teacher, tmp_path / "gpu", method, batch_tokens=4 * (SEQ_LEN + 1),
                         **{"teacher.device": "cuda"})
    capture(config, progress=False)
    assert verify_store(tmp_path / "gpu").ok
    positions = same_draws = 0
    for (sid, tok, got), (rsid, rtok, want) in zip(iter_sequences(tmp_path / "gpu"), iter_sequences(ref.store.path),
                                                   strict=True):
        assert sid == rsid and (tok == rtok).all()
        if want.head_ids is not None:
            assert torch.equal(got.head_ids, want.head_ids)
            torch.testing.assert_close(got.head_logprobs, want.head_logprobs, rtol=0, atol=1e-4)
            torch.testing.assert_close(got.tail_mass, want.tail_mass, rtol=1e-3, atol=1e-5)
        if want.sample_ids is not None:
            go, wo = got.sample_offsets(), want.sample_offsets()
            for i in range(want.num_positions):
                a = (got.sample_ids[go[i]:go[i + 1]], got.sample_counts[go[i]:go[i + 1]])
                b = (want.sample_ids[wo[i]:wo[i + 1]], want.sample_counts[wo[i]:wo[i + 1]])
                same_draws += bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
            positions += want.num_positions
    if positions:  # a draw can only move where a uniform falls within fp32 noise of a CDF step
        assert same_draws >= 0.99 * positions, (same_draws, positions)


def test_ans_entropy_stage_stores_the_same_targets_in_fewer_bytes(reference_stores, tmp_path):
    """``--entropy ans`` through the CLI: the same sequences and targets as the zstd store, fewer bytes."""
    from logitcache.testing.targets import assert_equal

    ref = reference_stores["hybrid"]
    out = tmp_path / "ans"
    result = CliRunner().invoke(main, cli_args(ref.with_overrides({"store.path": str(out)})) + ["--entropy", "ans"])
    assert result.exit_code == 0, result.output
    assert verify_store(out).ok
    assert read_manifest(out).to_dict()["store"]["encoding"]["version"] == 3
    pairs = list(zip(iter_sequences(out), iter_sequences(ref.store.path), strict=True))
    for (sa, ta, xa), (sb, tb, xb) in pairs:
        assert sa == sb and np.array_equal(ta, tb)
        assert_equal(xa, xb)
    assert inspect_store(out)["bytes_per_position"] < inspect_store(ref.store.path)["bytes_per_position"]


@pytest.mark.parametrize("fault", ["unit_start:2", "after_shard:2", "after_commit:1", "before_finalize:1"])
def test_sigkill_then_resume_is_byte_identical(reference_stores, tmp_path, fault):
    ref = reference_stores["sample"]
    out = tmp_path / "s"
    config = ref.with_overrides({"store.path": str(out), "batch_tokens": 2 * (SEQ_LEN + 1)})
    env = dict(os.environ, LOGITCACHE_FAULT=fault)
    cmd = [sys.executable, "-m", "logitcache.cli", *cli_args(config)]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not inspect_store(out)["complete"]
    assert verify_store(out).ok  # what is recorded is sound
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "already committed" in resumed.stderr
    assert tree_bytes(out) == tree_bytes(Path(ref.store.path))


def test_changed_config_is_refused_and_overwrite_starts_over(reference_stores, tmp_path):
    ref = reference_stores["topk"]
    out = tmp_path / "s"
    capture(ref.with_overrides({"store.path": str(out)}), progress=False)
    before = tree_bytes(out)
    with pytest.raises(StoreMismatchError, match="identity.sparsify.k: store has 5, this run has 6"):
        capture(ref.with_overrides({"store.path": str(out), "sparsify.k": 6}), progress=False)
    assert tree_bytes(out) == before
    result = CliRunner().invoke(main, cli_args(ref.with_overrides({"store.path": str(out), "sparsify.k": 6}))
                                + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert inspect_store(out)["params"] == {"k": 6}


def test_bad_corpus_leaves_no_store(tiny_teacher, tmp_path):
    empty = tmp_path / "corpus"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    out = tmp_path / "s"
    with pytest.raises(CorpusError):
        capture(make_config(tiny_teacher, out).with_overrides({"corpus.source": str(empty)}), progress=False)
    assert not (out / "manifest.json").exists()


def test_cli_inspect_json_and_verify_exit_codes(reference_stores):
    root = reference_stores["hybrid"].store.path
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", root, "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    for key in ("format_version", "method", "params", "teacher", "tokenizer_fingerprint", "seq_len", "sequences",
                "positions", "shards", "bytes_on_disk", "bytes_per_position", "mean_ids_per_position", "complete"):
        assert key in info, key
    assert runner.invoke(main, ["verify", root]).exit_code == 0


def test_cli_verify_fails_on_a_damaged_copy(reference_stores, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference_stores["topk"].store.path, copy)
    shard = copy / "shards" / "00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code == 1
    assert "shard 2" in result.output


def test_yaml_config_with_flag_override(reference_stores, tmp_path):
    import yaml

    ref = reference_stores["topk"]
    cfg = ref.with_overrides({"store.path": str(tmp_path / "s"), "sparsify.k": 3}).to_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["capture", "--config", str(tmp_path / "c.yaml"), "--k", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert inspect_store(tmp_path / "s")["params"] == {"k": 4}
    (tmp_path / "bad.yaml").write_text("sparsify:\n  methd: topk\n")
    result = CliRunner().invoke(main, ["capture", "--config", str(tmp_path / "bad.yaml")])
    assert result.exit_code != 0
    assert "did you mean 'sparsify.method'" in str(result.exception)
